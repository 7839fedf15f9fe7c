"""``npy``: one ``.npy`` file per sample; cheaper to read than ``torch.load``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config.schema import StorageConfig
from pipeline.data.storage.per_sample import PerSampleDataset, PerSampleFormat, PerSampleWriter


@dataclass
class NpyConfig(StorageConfig):
    name: str = "npy"


class Writer(PerSampleWriter):
    ext = "npy"

    def save(self, sample: np.ndarray, fh) -> None:
        np.save(fh, sample, allow_pickle=False)


class Dataset(PerSampleDataset):
    ext = "npy"

    def load(self, path) -> np.ndarray:
        return np.load(path, allow_pickle=False)


class Npy(PerSampleFormat):
    name = "npy"
    config = NpyConfig
    ext = "npy"
    writer_class = Writer
    dataset_class = Dataset


FORMAT = Npy()
