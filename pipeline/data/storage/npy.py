"""``npy``: one ``.npy`` file per sample; about 3x cheaper to read than ``torch.load``."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.storage.per_sample import PerSampleDataset, PerSampleWriter, check_samples


class Writer(PerSampleWriter):
    ext = "npy"

    def save(self, sample: np.ndarray, fh) -> None:
        np.save(fh, sample, allow_pickle=False)


class Dataset(PerSampleDataset):
    ext = "npy"

    def load(self, path) -> torch.Tensor:
        return torch.from_numpy(np.load(path, allow_pickle=False))


def check(root, spec, files) -> None:
    """Export integrity hook (pipeline.data.integrity): one .npy file per sample."""
    check_samples(root, spec, files, "npy")
