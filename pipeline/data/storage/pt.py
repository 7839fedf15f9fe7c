"""``pt``: one ``torch.save`` file per sample -- the classic recipe, and the slowest to read."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.storage.per_sample import PerSampleDataset, PerSampleWriter, check_samples


class Writer(PerSampleWriter):
    ext = "pt"

    def save(self, sample: np.ndarray, fh) -> None:
        torch.save(torch.from_numpy(sample), fh)


class Dataset(PerSampleDataset):
    ext = "pt"

    def load(self, path) -> torch.Tensor:
        return torch.load(path, weights_only=True)


def check(root, spec, files) -> None:
    """Export integrity hook (pipeline.data.integrity): one .pt file per sample."""
    check_samples(root, spec, files, "pt")
