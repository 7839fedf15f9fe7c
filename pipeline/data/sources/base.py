"""The contract of a data source: what the export reads samples from, and what its config alone tells.

A source is a module in this package that defines ``SOURCE``, an instance of a ``SourceKind`` subclass
(pipeline/data/sources/__init__.py finds it), plus one YAML in conf/source/ naming its config schema:

    class Digits(SourceKind):
        name = "digits"
        config = DigitsConfig                   # a dataclass extending pipeline.config.schema.SourceConfig
        def build(self, cfg): return DigitsSource()
    SOURCE = Digits()

``build(cfg)`` returns a ``Source``: ``spec`` (what the samples look like) and ``chunks()``, an iterator of
``(x, y)`` numpy arrays a chunk at a time, so that an export never holds more than one chunk of a large
source in memory. The optional hooks, with their defaults: ``count(cfg)`` and ``shape(cfg)`` (the sample
count and shape from the config alone, so sizes are checked before any data work; None when only reading
the data can tell), ``identity(cfg)`` (what defines the data besides its config, e.g. the files of a
folder; in the export's fingerprint), ``eight_bit(cfg)`` (the divisor d such that every value is
float32(k) / float32(d) for a k in 0..255, or the reason there is none: 8-bit storage, pipeline/data/
quantize.py) and ``validate(cfg)`` (checks across the source's own keys, as ``ConfigError``).

Source modules import nothing heavy at import time (scikit-learn, Pillow: inside ``build``): the config
layer imports them to register their schemas when Hydra composes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator, Protocol

import numpy as np


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


NOT_EIGHT_BIT = "its values are not 8-bit"


class SourceKind:
    """One kind of source (module docstring): required ``name``, ``config`` and ``build``."""

    name: ClassVar[str]
    config: ClassVar[type]  # its schema: a dataclass extending pipeline.config.schema.SourceConfig
    defined_by_config: ClassVar[bool] = True  # False: ``identity`` reads something else (e.g. files)

    def build(self, cfg) -> Source:
        raise NotImplementedError

    def count(self, cfg) -> int | None:
        return None

    def shape(self, cfg) -> tuple[int, ...] | None:
        return None

    def identity(self, cfg) -> dict | None:
        return None

    def eight_bit(self, cfg) -> float | str:
        return NOT_EIGHT_BIT

    def validate(self, cfg) -> None:
        """Raise ConfigError for a bad combination of this source's options (``cfg.source``)."""


def is_image(shape, *, rgb_only: bool = False) -> bool:
    """Whether samples of ``shape`` are images: [H, W] or [H, W, C] (with ``rgb_only``: C == 3)."""
    shape = tuple(shape)
    return len(shape) == 2 or (len(shape) == 3 and (shape[2] == 3 or not rgb_only))


def chunked(x: np.ndarray, y: np.ndarray, chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of arrays that a source already holds in memory."""
    for start in range(0, len(y), chunk):
        yield x[start : start + chunk], y[start : start + chunk]
