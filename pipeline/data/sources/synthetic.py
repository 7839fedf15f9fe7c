"""Synthetic images of any size, deterministic from a seed, generated block by block.

Sample i belongs to block i // block_size; each block is drawn from its own generator seeded with
(seed, block), so any block can be produced without the ones before it and the whole set is never
held in memory. Class c has a fixed random prototype; a sample is its class prototype plus noise,
so the data is learnable.

A parallel export (pipeline/data/writing.py) reads the blocks in worker processes: each is a ``Piece``
(its index), generated there from the config alone (each worker builds the prototypes once), so the
samples are the same whichever process draws them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np

from pipeline.config.checks import at_least, int_list, number
from pipeline.config.schema import Choice, SourceConfig
from pipeline.data.sources.base import Piece, SampleSpec, SourceKind


class SampleDtype(Choice):
    float16 = "float16"
    float32 = "float32"
    float64 = "float64"
    uint8 = "uint8"


@dataclass
class SyntheticConfig(SourceConfig):
    name: str = "synthetic"
    num_samples: int = at_least(2, 10_000)
    shape: List[int] = int_list([62, 47], valid="a non-empty list of integers >= 1, e.g. [62, 47]")
    num_classes: int = at_least(1, 10)
    dtype: SampleDtype = SampleDtype.float32
    seed: int = 0
    noise: float = number(1.0, at_least=0.0, valid="must be >= 0")
    block_size: int = at_least(1, 1024)  # samples generated per block; part of the data's definition


class SyntheticSource:
    def __init__(self, num_samples, shape, num_classes, dtype, seed, noise, block_size):
        self.seed, self.noise, self.block_size = int(seed), float(noise), int(block_size)
        self.spec = SampleSpec(
            num_samples=int(num_samples),
            shape=tuple(int(d) for d in shape),
            dtype=str(dtype),
            num_classes=int(num_classes),
            class_names=tuple(f"class_{c}" for c in range(int(num_classes))),
        )
        rng = np.random.default_rng([self.seed, 2**31])
        self.prototypes = rng.standard_normal((num_classes, *self.spec.shape), dtype=np.float32)

    def block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        start = b * self.block_size
        n = min(self.block_size, self.spec.num_samples - start)
        rng = np.random.default_rng([self.seed, b])
        y = rng.integers(0, self.spec.num_classes, size=n, dtype=np.int64)
        x = self.prototypes[y] + self.noise * rng.standard_normal((n, *self.spec.shape), np.float32)
        if self.spec.dtype == "uint8":
            x = np.clip(x * 32.0 + 128.0, 0, 255)
        return x.astype(self.spec.dtype, copy=False), y

    def chunks(self):
        for b in range(-(-self.spec.num_samples // self.block_size)):
            yield self.block(b)


_BUILT: dict[tuple, SyntheticSource] = {}  # per process: the source a worker reads blocks of


def _key(cfg) -> tuple:
    return (
        int(cfg.num_samples),
        tuple(int(d) for d in cfg.shape),
        int(cfg.num_classes),
        str(cfg.dtype),
        int(cfg.seed),
        float(cfg.noise),
        int(cfg.block_size),
    )


class Synthetic(SourceKind):
    name = "synthetic"
    config = SyntheticConfig

    def build(self, cfg) -> SyntheticSource:
        return SyntheticSource(*_key(cfg))

    def pieces(self, cfg, source: SyntheticSource, workers: int) -> list[Piece]:
        """One piece per block (the blocks are part of the data's definition)."""
        n, size = source.spec.num_samples, source.block_size
        return [Piece(min(size, n - b * size), b) for b in range(-(-n // size))]

    def read_piece(self, cfg, piece: Piece):
        key = _key(cfg)
        if key not in _BUILT:
            _BUILT.clear()
            _BUILT[key] = SyntheticSource(*key)
        return _BUILT[key].block(int(piece.ref))

    def count(self, cfg) -> int:
        return int(cfg.num_samples)

    def shape(self, cfg) -> tuple[int, ...]:
        return tuple(int(d) for d in cfg.shape)

    def eight_bit(self, cfg) -> float | str:
        """8-bit storage (pipeline/data/quantize.py) of uint8 samples only; float samples are Gaussian."""
        if str(cfg.dtype) == "uint8":
            return 255.0
        return f"source.dtype={cfg.dtype} draws Gaussian noise, not 8-bit values; use source.dtype=uint8"


SOURCE = Synthetic()
