"""``pt``: one ``torch.save`` file per sample -- the classic recipe, and the slowest to read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config.schema import StorageConfig
from pipeline.data.storage.per_sample import PerSampleDataset, PerSampleFormat, PerSampleWriter


@dataclass
class PtConfig(StorageConfig):
    name: str = "pt"


class Writer(PerSampleWriter):
    ext = "pt"

    def save(self, sample: np.ndarray, fh) -> None:
        import torch

        torch.save(torch.from_numpy(sample), fh)


class Dataset(PerSampleDataset):
    ext = "pt"

    def load(self, path) -> np.ndarray:
        import torch

        return torch.load(path, weights_only=True).numpy()


class Pt(PerSampleFormat):
    name = "pt"
    config = PtConfig
    ext = "pt"
    writer_class = Writer
    dataset_class = Dataset


FORMAT = Pt()
