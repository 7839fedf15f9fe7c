"""Data sources: where samples come from before they are exported.

A source is built from its config subtree and offers ``spec`` (what the samples look like) and
``chunks()``, an iterator of ``(x, y)`` numpy arrays a chunk at a time, so that an export never holds
more than one chunk of a large source in memory.

    from pipeline.data.sources import build_source
    src = build_source(cfg.source)
    for x, y in src.chunks():
        ...

A source module may define ``count(cfg)``: its sample count from the config alone, so that split and
batch sizes are validated before any data work (``declared_count``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np

SOURCES = {
    "digits": "pipeline.data.sources.digits",
    "image_folder": "pipeline.data.sources.image_folder",
    "lfw": "pipeline.data.sources.lfw",
    "synthetic": "pipeline.data.sources.synthetic",
}


@dataclass(frozen=True)
class SampleSpec:
    """Shape of one sample, its dtype, and how many samples and classes there are."""

    num_samples: int
    shape: tuple[int, ...]
    dtype: str
    num_classes: int
    class_names: tuple[str, ...]
    divisor: float | None = None  # uint8 samples stand for float32(k) / divisor (None: 255); see quantize

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


class Source(Protocol):
    spec: SampleSpec

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


def build_source(cfg) -> Source:
    if cfg.name not in SOURCES:
        raise ValueError(f"Unknown source {cfg.name!r}; valid: {sorted(SOURCES)}")
    return importlib.import_module(SOURCES[cfg.name]).build(cfg)


def declared_count(cfg) -> int | None:
    """Number of samples the source will yield, if its module can tell from the config alone
    (an optional module-level ``count(cfg)``); None when only reading the data can tell."""
    if cfg.name not in SOURCES:
        return None
    count = getattr(importlib.import_module(SOURCES[cfg.name]), "count", None)
    return None if count is None else int(count(cfg))


def source_identity(cfg) -> dict | None:
    """What defines a source's data besides its config (e.g. the files in a folder); None if nothing.

    A source module may define ``identity(cfg)``; the export fingerprint includes its result.
    """
    if cfg["name"] not in SOURCES:
        return None
    identity = getattr(importlib.import_module(SOURCES[cfg["name"]]), "identity", None)
    return identity(cfg) if identity is not None else None


def chunked(x: np.ndarray, y: np.ndarray, chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of arrays that a source already holds in memory."""
    for start in range(0, len(y), chunk):
        yield x[start : start + chunk], y[start : start + chunk]
