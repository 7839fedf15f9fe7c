"""Shared layout of the one-file-per-sample formats (``pt``, ``npy``).

Sample ``i`` lives at ``samples/<i // 10000>/<i>.<ext>`` so that no folder holds more than 10,000
files however large the export. Subclasses only say how one array is saved and loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FILES_PER_FOLDER = 10_000


def sample_path(root: Path, sid: int, ext: str) -> Path:
    return root / "samples" / f"{sid // FILES_PER_FOLDER:05d}" / f"{sid:09d}.{ext}"


class PerSampleWriter:
    ext = ""

    def __init__(self, root: Path, spec, cfg) -> None:
        self.root, self.spec, self.next_id = Path(root), spec, 0

    def save(self, sample: np.ndarray, path: Path) -> None:
        raise NotImplementedError

    def write(self, x: np.ndarray, y: np.ndarray) -> None:
        for sample in x:
            path = sample_path(self.root, self.next_id, self.ext)
            if self.next_id % FILES_PER_FOLDER == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
            # a copy: saving a view of a larger array can store the whole array in every file
            self.save(np.array(sample, copy=True, order="C"), path)
            self.next_id += 1

    def close(self) -> None:
        pass


class PerSampleDataset(torch.utils.data.Dataset):
    ext = ""

    def __init__(self, root: Path, spec, labels: np.ndarray, ids: np.ndarray, cfg=None) -> None:
        self.root, self.spec = Path(root), spec
        self.ids = np.asarray(ids, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)[self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, path: Path) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, i: int):
        return self.load(sample_path(self.root, int(self.ids[i]), self.ext)), int(self.labels[i])
