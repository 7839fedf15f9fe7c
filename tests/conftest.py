"""Shared fixtures: a throw-away project root per test (with a ready MLflow store), Hydra's compose API,
and the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")


def untracked_files() -> set[str] | None:
    """Files of this checkout that git shows as untracked (ignored ones left out); None where the tests do
    not run from a git checkout of their own (an sdist, no git)."""
    try:
        top = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--show-toplevel"], capture_output=True, text=True
        )
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != REPO:
            return None
        status = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=all", "-z"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return {entry[3:] for entry in status.stdout.split("\0") if entry.startswith("?? ")}


@pytest.fixture(scope="session", autouse=True)
def _checkout_stays_clean():
    """Tests write only under temporary folders: the run fails if the checkout gained an untracked file
    that git does not ignore (a store, an export, a log written relative to the working directory)."""
    before = untracked_files()
    yield
    if before is None:
        return
    new = sorted((untracked_files() or set()) - before)
    if new:
        pytest.fail(f"the tests left files in the checkout {REPO}: {', '.join(new)}", pytrace=False)


@pytest.fixture(autouse=True)
def _isolated_env(request, monkeypatch, tmp_path):
    """No test writes into the checkout's outputs/ or reads a developer's MLflow settings. Each test's
    project store (``tmp_path/outputs/mlflow.db``) starts as a copy of an empty, migrated store, unless
    the test is marked ``fresh_store``."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PIPELINE_MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    if request.node.get_closest_marker("fresh_store") is None:
        copy_store(request.getfixturevalue("mlflow_template"), tmp_path)


@pytest.fixture(autouse=True)
def _no_loader_workers_left():
    """Loader worker processes a test left running (a loader never closed, persistent workers) end with
    the test, so they do not count in the next test's processes or memory."""
    yield
    from pipeline.training.handoff.pool import close_all

    close_all()


@pytest.fixture(scope="session")
def mlflow_template() -> Path:
    """An empty MLflow SQLite store with MLflow's schema in place, made once per MLflow version on this
    machine: a new store runs ~3 s of schema migrations, a copy takes a millisecond. It holds only
    MLflow's Default experiment (unused); jobs create their experiment in their copy."""
    from importlib.metadata import version

    template = Path(tempfile.gettempdir(), f"pipeline-tests-{os.getuid()}", f"mlflow-{version('mlflow')}.db")
    if not template.exists():
        _make_template(template)
    return template


def _make_template(template: Path) -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    template.parent.mkdir(parents=True, exist_ok=True)
    partial = template.with_name(f".{template.name}.{os.getpid()}")
    cwd = os.getcwd()
    os.chdir(template.parent)  # the Default experiment's artifact folder: ./mlruns, beside the template
    try:
        MlflowClient(f"sqlite:///{partial}").search_experiments()
    finally:
        os.chdir(cwd)
    os.replace(partial, template)  # complete or absent, also when sessions race


def copy_store(template: Path, root: Path) -> Path:
    """Put a copy of ``template`` where a job under ``root`` keeps its store (``sqlite_uri(root)``)."""
    store = root / "outputs" / "mlflow.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, store)
    return store


def compose_cfg(root: Path, overrides: list[str] = ()):
    """Compose conf/config.yaml like the CLI does, with paths under ``root``. The final model is not logged
    to MLflow unless a test asks (``tracking.log_model=true``): it costs about 1.5 s a job, and
    tests/test_logged_model.py checks it."""
    import pipeline.config

    pipeline.config.register()

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                f"paths.root={root}",
                f"paths.output_dir={root}/run",
                "tracking.log_model=false",
                *overrides,
            ],
        )


def cli_env(root: Path, env: dict | None = None) -> dict:
    """The environment of a real CLI run: this checkout importable, outputs under ``root``."""
    return {**os.environ, "PIPELINE_ROOT": str(root), "PYTHONPATH": str(REPO), **(env or {})}


def run_command(root: Path, argv: list[str], timeout: float = 300, env: dict | None = None):
    """Run ``argv`` for real, in a subprocess in ``root``, with this checkout importable and outputs under
    ``root``."""
    return subprocess.run(
        argv, cwd=root, env=cli_env(root, env), capture_output=True, text=True, timeout=timeout
    )


def start_cli(root: Path, *args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    """Start ``python -m pipeline`` for real in ``root`` (as ``run_cli``) and return at once; ``popen``:
    ``subprocess.Popen`` options (stdout, stderr, start_new_session ...)."""
    argv = [sys.executable, "-m", "pipeline", *args]
    return subprocess.Popen(argv, cwd=root, env=env if env is not None else cli_env(root), text=True, **popen)


def run_cli(root: Path, *args: str, timeout: float = 300, env: dict | None = None):
    """Run ``python -m pipeline`` for real, in a subprocess, with outputs under ``root``."""
    return run_command(root, [sys.executable, "-m", "pipeline", *args], timeout, env)


def sqlite_uri(root: Path) -> str:
    return f"sqlite:///{root}/outputs/mlflow.db"


@pytest.fixture
def mlflow_server(tmp_path, mlflow_template):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite + artifacts under tmp_path/server); yields its URL."""
    from tests.mlflow_server import serve

    with serve(tmp_path / "server", template=mlflow_template) as url:
        yield url
