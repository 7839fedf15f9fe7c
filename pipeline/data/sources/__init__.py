"""Data sources: where samples come from before they are exported.

    from pipeline.data.sources import build_source, get_source
    src = build_source(cfg.source)          # spec + chunks(): (x, y) numpy arrays a chunk at a time
    get_source("synthetic").count(cfg.source)   # what the config alone tells (base.py: SourceKind)

**Adding a source** = one module here that defines ``SOURCE`` (a ``SourceKind``: its config dataclass and
``build``; base.py holds the contract and its defaults) + one YAML in conf/source/ whose defaults name
``base_<name>``. Every module of this package is looked at once, on first use: those with a ``SOURCE`` are
the sources (``register_source`` adds one from outside). A YAML may also be a preset of another source's
schema (conf/source/lfw_shaped.yaml is ``synthetic`` with LFW's sizes).
"""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.data.sources.base import Piece, SampleSpec, Source, SourceKind, chunked

__all__ = ["Piece", "SampleSpec", "Source", "SourceKind", "build_source", "chunked", "get_source", "sources"]

_SOURCES: dict[str, SourceKind] = {}
_DISCOVERED = False


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        kind = vars(module).get("SOURCE")
        if isinstance(kind, SourceKind):
            _SOURCES.setdefault(kind.name, kind)
    _DISCOVERED = True


def sources() -> dict[str, SourceKind]:
    _discover()
    return dict(_SOURCES)


def get_source(name: str) -> SourceKind:
    known = sources()
    if name not in known:
        raise ValueError(f"Unknown source {name!r}; valid: {sorted(known)}")
    return known[name]


def register_source(kind: SourceKind, *, option: bool = True) -> None:
    """Make ``kind`` known by name (export, validate) and its schema composable (``base_<name>``, and with
    ``option`` the option ``source=<name>`` itself)."""
    from pipeline.config.schema import register_source_schema

    if not isinstance(kind, SourceKind):
        raise TypeError(f"register_source takes a SourceKind, got {type(kind).__name__}")
    _discover()
    _SOURCES[kind.name] = kind
    register_source_schema(kind.name, kind.config, option=option)


def build_source(cfg) -> Source:
    return get_source(cfg.name).build(cfg)
