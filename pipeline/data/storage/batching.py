"""Batched reads shared by the fast formats: one read per batch instead of one per sample.

    from pipeline.data.storage.batching import RandomBatchSampler, passthrough_collate, shuffle_quality
    shuffle_quality(sampler.epoch_order(seed))    # 1.0 = as mixed as a uniform shuffle
    sampler = RandomBatchSampler(n, 64, shuffle=True, drop_last=False, seed=0)

A Dataset whose ``__getitems__`` returns an already collated ``(x, y)`` batch sets
``collate_fn = staticmethod(passthrough_collate)`` and may offer a ``batch_sampler(...)`` hook;
pipeline.training.loading uses both when present. Reads themselves live in pipeline/data/storage/stream.py.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.training.seeding import derive_seed


def passthrough_collate(batch):
    """The batch is already collated by ``__getitems__``."""
    return batch


class EpochBatches(torch.utils.data.Sampler):
    """Base of the batch samplers: epoch e's order is a function of (seed, e) only, as for
    pipeline.training.seeding.EpochShuffle, so a resumed run replays it with ``set_epoch``. The epoch advances
    by itself each time an iteration starts."""

    seed = 0
    epoch = 0
    n = 0  # positions per epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def next_epoch_seed(self) -> int:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return derive_seed(self.seed, "shuffle", epoch)


def chop(order: np.ndarray, batch_size: int, drop_last: bool, sort: bool):
    """Consecutive batches of ``order``; each batch's indices sorted when ``sort``."""
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        batch = order[start : start + batch_size]
        yield np.sort(batch) if sort else batch


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


class RandomBatchSampler(EpochBatches):
    """Batches of a uniform random permutation (new each epoch), each batch's indices sorted.

    Without ``shuffle`` the batches are consecutive. Yields numpy int64 arrays; exposes
    ``batch_size`` and ``drop_last`` like torch's BatchSampler.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0):
        self.n, self.batch_size, self.shuffle, self.drop_last = int(n), int(batch_size), shuffle, drop_last
        self.seed = int(seed)

    def epoch_order(self, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).permutation(self.n)

    def __len__(self) -> int:
        return num_batches(self.n, self.batch_size, self.drop_last)

    def __iter__(self):
        if self.shuffle:
            order = self.epoch_order(self.next_epoch_seed())
        else:
            order = np.arange(self.n, dtype=np.int64)
        yield from chop(order, self.batch_size, self.drop_last, sort=self.shuffle)


def shuffle_quality(order: np.ndarray) -> float:
    """How mixed an epoch order is: mean |step| between consecutive positions over a uniform
    shuffle's expected (n + 1) / 3 -- about 1.0 for a full shuffle, near 0 for sequential reads."""
    order = np.asarray(order, dtype=np.int64)
    if len(order) < 2:
        return 1.0
    return float(np.abs(np.diff(order)).mean() / ((len(order) + 1) / 3))
