"""scikit-learn's bundled digits: 1,797 images of 8x8 in 10 classes, offline. Pixels scaled to [0, 1]."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config.schema import SourceConfig
from pipeline.data.sources.base import SampleSpec, SourceKind, chunked


@dataclass
class DigitsConfig(SourceConfig):
    name: str = "digits"


class DigitsSource:
    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        data = load_digits()
        self.x = (data.images / 16.0).astype(np.float32)
        self.y = data.target.astype(np.int64)
        self.spec = SampleSpec(
            num_samples=len(self.y),
            shape=tuple(self.x.shape[1:]),
            dtype="float32",
            num_classes=10,
            class_names=tuple(str(n) for n in data.target_names),
        )

    def chunks(self):
        return chunked(self.x, self.y)


NUM_SAMPLES = 1797  # fixed: the set is bundled with scikit-learn


class Digits(SourceKind):
    name = "digits"
    config = DigitsConfig

    def build(self, cfg) -> DigitsSource:
        return DigitsSource()

    def count(self, cfg) -> int:
        return NUM_SAMPLES

    def shape(self, cfg) -> tuple[int, ...]:
        return (8, 8)

    def eight_bit(self, cfg) -> float:
        """The pixels are integers 0..16 divided by 16: 8-bit storage keeps the integers
        (pipeline/data/quantize.py)."""
        return 16.0


SOURCE = Digits()
