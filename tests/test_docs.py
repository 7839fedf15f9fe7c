"""Every repository path, module and link that the docs, docstrings and comments name exists in the checkout.

Read: README.md and docs/*.md (all of their text), the docstrings and comments of every Python module under
pipeline/ and benchmarks/, the comments of conf/**/*.yaml, pyproject.toml and .ci/run. Checked in them:

- paths under the repository's own folders (``pipeline/...``, ``docs/...``, ``conf/...``, ``tests/...``,
  ``benchmarks/...``, ``.ci/...``): the file or folder exists, or git ignores it (``conf/local/default.yaml``
  is a file a user creates); a placeholder (``conf/storage/<name>.yaml``, ``pipeline/data/storage/*.py``,
  ``{name}``) is not a path;
- modules run or imported in examples (``python -m pipeline.bench``, ``from pipeline.data.codec import``):
  the module is a file of this checkout (modules of other projects are left alone);
- relative markdown links (``[guide](docs/memory.md)``, from docs/: ``(storage-formats.md#anchor)``).

A failure lists every stale reference as ``file:line: reference``.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("pipeline", "docs", "conf", "tests", "benchmarks", ".ci")
PACKAGES = ("pipeline", "benchmarks", "tests")  # modules of this checkout that examples run or import

PATH = re.compile(r"(?<![\w./:~$-])((?:%s)/[\w./-]*)" % "|".join(re.escape(r) for r in ROOTS))
_NAME = r"((?:%s)(?:\.\w+)*)" % "|".join(PACKAGES)
MODULE = re.compile(rf"(?:python3? -m\s+|^\s*import\s+){_NAME}\b|\bfrom\s+{_NAME}\s+import\b", re.M)
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
PLACEHOLDER = tuple("<{*[$")  # what follows a path's last character when it is a pattern, not a path


def texts() -> list[tuple[Path, int, str]]:
    """(file, first line, text) for every piece of prose the checkout holds."""
    out = []
    for md in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        out.append((md, 1, md.read_text()))
    for folder in ("pipeline", "benchmarks"):
        for py in sorted((REPO / folder).rglob("*.py")):
            out += python_prose(py)
    for cfg in [*sorted((REPO / "conf").rglob("*.yaml")), REPO / "pyproject.toml", REPO / ".ci" / "run"]:
        for n, line in enumerate(cfg.read_text().splitlines(), 1):
            if "#" in line:
                out.append((cfg, n, line[line.index("#") :]))
    return out


def python_prose(path: Path) -> list[tuple[Path, int, str]]:
    """The docstrings and comments of a Python file, each with the line it starts on."""
    source = path.read_text()
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    out.append((path, body[0].lineno, body[0].value.value))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out.append((path, tok.start[0], tok.string))
    return out


def git_ignored(rel: str) -> bool:
    proc = subprocess.run(["git", "check-ignore", "-q", rel], cwd=REPO, capture_output=True)
    return proc.returncode == 0


def module_exists(name: str) -> bool:
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def stale_references() -> list[str]:
    stale = []
    for path, first, text in texts():
        where = path.relative_to(REPO)
        for m in PATH.finditer(text):
            ref = m.group(1).rstrip(".-/")
            following = text[m.end() : m.end() + 1]
            if following.startswith(PLACEHOLDER) or ref.endswith(("...", "..")):
                continue
            if not (REPO / ref).exists() and not git_ignored(ref):
                stale.append(f"{where}:{first + text.count(chr(10), 0, m.start())}: {ref}")
        for m in MODULE.finditer(text):
            name = m.group(1) or m.group(2)
            if not module_exists(name):
                stale.append(f"{where}:{first + text.count(chr(10), 0, m.start())}: module {name}")
        if path.suffix == ".md":
            for m in LINK.finditer(text):
                target = m.group(1)
                if "://" in target or target.startswith("mailto:"):
                    continue
                if not (path.parent / target).exists():
                    stale.append(f"{where}:{first + text.count(chr(10), 0, m.start())}: link {target}")
    return stale


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout (an sdist): no docs to check")
def test_paths_modules_and_links_named_in_docs_and_docstrings_exist():
    stale = stale_references()
    assert not stale, "stale references (the path, module or link does not exist):\n" + "\n".join(stale)


def test_the_checker_finds_a_stale_path_module_and_link(monkeypatch):
    """The checker itself: a stale path, module and link are reported; real ones and placeholders are not."""
    import tests.test_docs as checker

    text = (
        "pipeline/nowhere.py, `python -m pipeline.nowhere`, [guide](missing.md), pipeline/config/schema.py,\n"
        "`python -m pipeline.bench`, from pipeline.data.codec import Codec, from mlflow import x\n"
        "conf/storage/<name>.yaml, pipeline/data/storage/*.py, outputs/..., conf/local/default.yaml,\n"
        "[ok](memory.md#scaling), [web](https://example.org/docs/x.md), http://host/docs/none.md\n"
    )
    monkeypatch.setattr(checker, "texts", lambda: [(REPO / "docs" / "x.md", 1, text)])
    assert checker.stale_references() == [
        "docs/x.md:1: pipeline/nowhere.py",
        "docs/x.md:1: module pipeline.nowhere",
        "docs/x.md:1: link missing.md",
    ]
