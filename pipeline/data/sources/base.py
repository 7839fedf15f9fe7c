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

**Parallel exports** (pipeline/data/writing.py) use three more hooks, whose defaults keep a source serial:
``pieces(cfg, source, workers)`` splits a built source into independent ``Piece``s -- runs of consecutive
samples, in sample order, each described by something small and picklable (files of an image folder, a
block of the synthetic source) -- and ``read_piece(cfg, piece)`` reads one of them in a worker process (it
gets the source's config as a plain, resolved ``DictConfig``, never the built source), so that reading,
decoding and resizing run on every core. Default: None, the source is read by ``chunks()`` in the exporting
process, whose chunks the workers still convert and write: lfw and digits, in memory once loaded, keep it
(their chunks are ranges of the loaded arrays, shipped to the workers).
``build_parallel(cfg, pmap, workers)`` builds the source with ``pmap(fn, items)``, an ordered map that may
run the picklable ``fn`` in the ``workers`` worker processes, for the work of building (an image folder's
check of every file); default: ``build(cfg)``. Whatever a worker reads must not depend on which worker
reads it, or on how many there are: the export's content is the same for any number of workers.

Source modules import nothing heavy at import time (scikit-learn, Pillow: inside ``build``): the config
layer imports them to register their schemas when Hydra composes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Protocol

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


@dataclass(frozen=True)
class Piece:
    """``n`` consecutive samples that a worker process reads alone (``SourceKind.read_piece``); ``ref`` says
    which, small and picklable: a block index, a tuple of files."""

    n: int
    ref: Any


PMap = Callable[[Callable, Iterable], Iterator]  # an ordered map, maybe over worker processes

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

    def build_parallel(self, cfg, pmap: PMap, workers: int) -> Source:
        """``build``, with ``pmap`` for the work of building (module docstring). Default: ``build(cfg)``."""
        return self.build(cfg)

    def pieces(self, cfg, source: Source, workers: int) -> list[Piece] | None:
        """The built ``source`` as independent pieces in sample order (their ``n`` sum to the sample count),
        for ``workers`` processes; None (the default): not split, read serially by ``chunks()``."""
        return None

    def read_piece(self, cfg, piece: Piece) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of one piece of ``pieces``, in a worker process; ``cfg``: the source's config."""
        raise NotImplementedError(f"source {self.name!r} splits into pieces but cannot read them")


def is_image(shape, *, rgb_only: bool = False) -> bool:
    """Whether samples of ``shape`` are images: [H, W] or [H, W, C] (with ``rgb_only``: C == 3)."""
    shape = tuple(shape)
    return len(shape) == 2 or (len(shape) == 3 and (shape[2] == 3 or not rgb_only))


def chunked(x: np.ndarray, y: np.ndarray, chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of arrays that a source already holds in memory."""
    for start in range(0, len(y), chunk):
        yield x[start : start + chunk], y[start : start + chunk]
