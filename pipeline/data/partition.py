"""Partition stage: a seeded split of sample ids into train and val.

    from pipeline.data.partition import partition, save_split
    split = partition(labels, cfg.split)       # split.train, split.val: sorted int64 id arrays
    save_split(split, run_dir / "split.npz")

The train part has exactly ``int(n * ratio)`` ids; the parts are disjoint and together hold every
id. With ``stratify=true`` each class keeps its proportion in both parts -- possible only when every
class has at least 2 samples and each part can hold one sample of every class. Otherwise (LFW has
thousands of one-image people) the split falls back to a plain seeded shuffle, says so in the log,
and records ``stratified=False``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class SplitError(ValueError):
    pass


@dataclass
class Split:
    train: np.ndarray
    val: np.ndarray
    stratified: bool

    @property
    def digest(self) -> str:
        h = hashlib.sha256(self.train.astype("<i8").tobytes())
        h.update(b"|")
        h.update(self.val.astype("<i8").tobytes())
        return h.hexdigest()[:16]


def size_problem(n: int, ratio: float, of: str = "") -> str | None:
    """Why ``ratio`` of ``n`` samples leaves a part empty (``of``: whose samples, for messages), or None."""
    n_train = int(n * ratio)
    if 0 < n_train < n:
        return None
    return (
        f"leaves {'train' if n_train == 0 else 'val'} empty for the {n} samples{of} "
        f"(train would hold int({n} * {ratio}) = {n_train}); valid: 1 <= int({n} * ratio) <= {n - 1}"
    )


def train_size(n: int, ratio: float) -> int:
    """The train part's size: ``int(n * ratio)``, checked to leave neither part empty."""
    why = size_problem(n, ratio)
    if why is not None:
        raise SplitError(f"split.ratio={ratio} {why}")
    return int(n * ratio)


def partition(labels: np.ndarray, cfg) -> Split:
    labels = np.asarray(labels)
    n = len(labels)
    n_train = train_size(n, cfg.ratio)
    ids = np.arange(n, dtype=np.int64)
    stratified = False
    if cfg.stratify:
        classes, counts = np.unique(labels, return_counts=True)
        k = len(classes)
        if counts.min() >= 2 and k <= n_train and k <= n - n_train:
            from sklearn.model_selection import train_test_split

            train, val = train_test_split(
                ids, train_size=n_train, stratify=labels, random_state=cfg.seed, shuffle=True
            )
            stratified = True
        else:
            log.warning(
                "split: cannot stratify (%d classes, smallest has %d sample(s), train %d, val %d); "
                "falling back to a plain seeded shuffle",
                k,
                counts.min(),
                n_train,
                n - n_train,
            )
    if not stratified:
        perm = np.random.default_rng(cfg.seed).permutation(n)
        train, val = perm[:n_train], perm[n_train:]
    return Split(np.sort(train).astype(np.int64), np.sort(val).astype(np.int64), stratified)


def save_split(split: Split, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, train=split.train, val=split.val, stratified=np.array(split.stratified))
    return path


def load_split(path: Path) -> Split:
    with np.load(path, allow_pickle=False) as z:
        return Split(z["train"], z["val"], bool(z["stratified"]))
