"""Paths built from names found in data (class names, file names, file lists) stay inside their root.

    from pipeline.data.safe_paths import safe_join, safe_name, UnsafePath
    path = safe_join(export_root, "samples/00000/000000001.npy")   # -> absolute path inside export_root
    safe_join(export_root, "../../etc/passwd")                     # raises UnsafePath
    folder = safe_join(root, safe_name(class_name))                 # one path component, nothing else
    rel = safe_relpath("samples/00000/000000001.npy")              # lexical only: no file system calls

``safe_join`` resolves symlinks and ``..`` and refuses any result that is not inside ``root`` (so a
symlink planted in the data cannot lead out either); ``safe_name`` accepts only a single, ordinary
file name; ``safe_relpath`` is the cheap lexical check for long lists of names (relative, no ``..``,
no empty or ``.`` component) -- pair it with a directory scan that does not follow symlinks. Use them
wherever a path is derived from the contents of data rather than from the config.
"""

from __future__ import annotations

import os
from pathlib import Path


class UnsafePath(ValueError):
    """A name or relative path taken from data that would leave its root directory."""


def safe_name(name: str) -> str:
    """``name`` if it is one ordinary path component (no separator, not ``.``/``..``, no NUL)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "\x00" in name:
        raise UnsafePath(f"{name!r} is not a usable file name")
    if "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        raise UnsafePath(f"{name!r} contains a path separator; a single file name is required")
    return name


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """``root / parts...`` resolved, guaranteed to lie inside ``root`` (resolved); else UnsafePath."""
    base = Path(root).resolve()
    for part in parts:
        if not isinstance(part, str) or "\x00" in part:
            raise UnsafePath(f"{part!r} is not a usable path")
        if Path(part).is_absolute() or part.startswith(("/", "\\")):
            raise UnsafePath(f"{part!r} is absolute; a path relative to {base} is required")
    target = base.joinpath(*parts).resolve()
    if target != base and not target.is_relative_to(base):
        raise UnsafePath(f"{'/'.join(parts)!r} resolves to {target}, outside {base}")
    return target


def safe_relpath(rel: str) -> str:
    """``rel`` if it is a plain relative POSIX path (no ``..``/``.``/empty components, no NUL); lexical."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel or rel.startswith("/"):
        raise UnsafePath(f"{rel!r} is not a plain relative path")
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise UnsafePath(f"{rel!r} has an empty, '.' or '..' component")
    return rel
