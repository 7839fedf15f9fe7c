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

from pipeline.data.registry import Registry
from pipeline.data.sources.base import Piece, SampleSpec, Source, SourceKind, chunked

__all__ = ["Piece", "SampleSpec", "Source", "SourceKind", "build_source", "chunked", "get_source", "sources"]

_SOURCES = Registry(__name__, "SOURCE", SourceKind, "source")


def sources() -> dict[str, SourceKind]:
    return _SOURCES.all()


def get_source(name: str) -> SourceKind:
    return _SOURCES.get(name)


def register_source(kind: SourceKind, *, option: bool = True) -> None:
    """Make ``kind`` known by name (export, validate) and its schema composable (``base_<name>``, and with
    ``option`` the option ``source=<name>`` itself)."""
    from pipeline.config.schema import register_source_schema

    _SOURCES.add(kind)
    register_source_schema(kind.name, kind.config, option=option)


def build_source(cfg) -> Source:
    return get_source(cfg.name).build(cfg)
