"""Samplers: which samples each batch of each epoch holds, and in which order -- every one in this module.

    from pipeline.data.sampling import RandomBatchSampler, BlockShuffleBatchSampler, EpochShuffle
    sampler = RandomBatchSampler(n, 64, shuffle=True, drop_last=False, seed=0)
    for request in sampler:                 # epoch 0: BatchRequests (positions + epoch)
        x, y = dataset.__getitems__(request)
    sampler.set_epoch(3)                    # the next pass is epoch 3's (a resumed run)
    mine = sampler.for_rank(1, 2)           # torchrun: rank 1 of 2's share of every epoch
    mine.num_samples                        # positions it yields per epoch (before drop_last)

**The contract** (``EpochBatchSampler``): epoch e's batches are a function of (seed, e) only -- never of the
worker count, the prefetching or how many epochs ran before in this process -- so a resumed run replays an
epoch with ``set_epoch`` and every parallel setting sees the same batches. The epoch advances by itself each
time an iteration starts. A batch is a ``BatchRequest``: the dataset positions it holds, in the order the
batch holds them, and the epoch it belongs to (per-sample augmentation draws from (seed, epoch, sample id)).
``for_rank(rank, world)`` gives one torchrun rank's share; by default batches r, r + W, ... of every epoch
(``RankBatches``: every rank computes the same epoch and keeps its own), or a sampler's own split
(``BlockShuffleBatchSampler``: each rank reads its own slice of each shard). ``num_samples`` and ``len`` are
per rank.

``EpochShuffle`` is the per-item counterpart, for datasets that are plain torch Datasets (one sample per
``__getitem__``). This module imports no torch at import time: the format modules that use it are imported
when the config is composed (pipeline/data/storage/__init__.py).
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterator

import numpy as np

from pipeline.seeds import derive_seed


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


class BatchRequest:
    """One batch as a sampler hands it to ``BatchedDataset.__getitems__``: dataset positions (int64, in the
    batch's order) and the epoch (-1: not from an epoch, e.g. plots). Iterating it gives the positions."""

    __slots__ = ("positions", "epoch")

    def __init__(self, positions, epoch: int = -1) -> None:
        self.positions = np.asarray(positions, dtype=np.int64)
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self):
        return iter(self.positions.tolist())

    def __array__(self, dtype=None, copy=None):
        return self.positions if dtype is None else self.positions.astype(dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(epoch={self.epoch}, positions={self.positions.tolist()})"

    def part(self, a: int, b: int) -> BatchRequest:
        """Samples ``a:b`` of this batch (decode threads read the parts of a batch side by side)."""
        return BatchRequest(self.positions[a:b], self.epoch)


def as_request(batch) -> BatchRequest:
    """``batch`` as a BatchRequest: itself, or plain positions (a list, an array) outside any epoch."""
    return batch if isinstance(batch, BatchRequest) else BatchRequest(batch)


def chop(order: np.ndarray, batch_size: int, drop_last: bool, sort: bool, epoch: int) -> Iterator:
    """Consecutive batches of ``order`` as BatchRequests of ``epoch``; each batch's positions sorted when
    ``sort`` (a batched read then needs no reordering; no loss averaged over a batch can see the order)."""
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        batch = order[start : start + batch_size]
        yield BatchRequest(np.sort(batch) if sort else batch, epoch)


class EpochBatchSampler:
    """The contract of a batch sampler (module docstring). Subclasses give ``num_samples`` and
    ``batches(epoch)``; ``for_rank`` defaults to dealing out whole batches (``RankBatches``)."""

    batch_size: int
    drop_last: bool

    def __init__(self, batch_size: int, drop_last: bool, seed: int = 0) -> None:
        self.batch_size, self.drop_last, self.seed = int(batch_size), bool(drop_last), int(seed)
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        """Positions this sampler yields per epoch (this rank's), before ``drop_last``."""
        raise NotImplementedError

    def batches(self, epoch: int) -> Iterator[BatchRequest]:
        """Epoch ``epoch``'s batches (a function of seed and epoch only)."""
        raise NotImplementedError

    def order(self, epoch: int) -> np.ndarray:
        """Every position of epoch ``epoch`` in the order its batches hold them (a sampler that reads while
        it yields overrides this to read nothing)."""
        parts = [b.positions for b in self.batches(epoch)]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shuffle_seed(self, epoch: int) -> int:
        return derive_seed(self.seed, "shuffle", epoch)

    def for_rank(self, rank: int, world: int) -> EpochBatchSampler:
        """This sampler's share for torchrun rank ``rank`` of ``world``."""
        return RankBatches(self, rank, world)

    replicable = True  # batches(epoch) only computes: a loader worker may replay it for its own batches

    def for_worker(self, worker: int, workers: int) -> EpochBatchSampler:
        """What loader worker ``worker`` of ``workers`` replays: batches w, w + W, ... of every epoch."""
        return RankBatches(self, worker, workers)

    def next_epoch(self) -> int:
        """The epoch of the pass that starts now (the epoch then advances, as a pass over it does)."""
        epoch, self.epoch = self.epoch, self.epoch + 1
        return epoch

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[BatchRequest]:
        epoch, self.epoch = self.epoch, self.epoch + 1  # runs at the first next(), not at iter()
        yield from self.batches(epoch)


class RandomBatchSampler(EpochBatchSampler):
    """Batches of a uniform random permutation (new each epoch), each batch's positions sorted. Without
    ``shuffle`` the batches are consecutive."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0) -> None:
        super().__init__(batch_size, drop_last, seed)
        self.n, self.shuffle = int(n), bool(shuffle)

    @property
    def num_samples(self) -> int:
        return self.n

    def epoch_order(self, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).permutation(self.n)

    def batches(self, epoch: int) -> Iterator[BatchRequest]:
        if self.shuffle:
            order = self.epoch_order(self.shuffle_seed(epoch))
        else:
            order = np.arange(self.n, dtype=np.int64)
        return chop(order, self.batch_size, self.drop_last, sort=self.shuffle, epoch=epoch)


class RankBatches(EpochBatchSampler):
    """Rank ``rank``'s share of ``inner``: batches r, r + W, r + 2W, ... of each epoch. Every rank computes
    the same epoch and keeps its own; together the ranks see every sample once per epoch, without padding."""

    def __init__(self, inner: EpochBatchSampler, rank: int, world: int) -> None:
        super().__init__(inner.batch_size, inner.drop_last, inner.seed)
        self.inner, self.rank, self.world = inner, int(rank), int(world)

    def batches(self, epoch: int) -> Iterator[BatchRequest]:
        for i, batch in enumerate(self.inner.batches(epoch)):
            if i % self.world == self.rank:
                yield batch

    def __len__(self) -> int:
        return len(range(self.rank, len(self.inner), self.world))

    @property
    def num_samples(self) -> int:
        """Samples in this rank's batches per epoch (only the epoch's last batch may be short)."""
        n_batches, bs, n = len(self.inner), self.batch_size, self.inner.num_samples
        mine = range(self.rank, n_batches, self.world)
        total = len(mine) * bs
        if not self.drop_last and n_batches and (n_batches - 1) in mine:
            total -= n_batches * bs - n
        return total


class ReadAhead(EpochBatchSampler):
    """``inner``'s batches, each announced ``AHEAD`` batches before it is yielded (``advise(positions)``:
    memmap asks the kernel to start reading its rows), so a cold read finds up to ``AHEAD + 1`` batches of
    rows in flight, not one. It runs where the sampler runs -- the main process, or the prefetch thread --
    and the page cache it fills serves DataLoader workers as well. Under torchrun the batches are dealt out
    first (``inner.for_rank``), so a rank asks only for its own."""

    AHEAD = 2

    def __init__(self, inner: EpochBatchSampler, advise: Callable[[np.ndarray], None]) -> None:
        super().__init__(inner.batch_size, inner.drop_last, inner.seed)
        self.inner, self.advise = inner, advise

    @property
    def num_samples(self) -> int:
        return self.inner.num_samples

    def __len__(self) -> int:
        return len(self.inner)

    def for_rank(self, rank: int, world: int) -> ReadAhead:
        return ReadAhead(self.inner.for_rank(rank, world), self.advise)

    def for_worker(self, worker: int, workers: int) -> ReadAhead:
        return ReadAhead(self.inner.for_worker(worker, workers), self.advise)  # each asks for its own

    def order(self, epoch: int) -> np.ndarray:
        return self.inner.order(epoch)  # without advising the kernel of every batch

    def batches(self, epoch: int) -> Iterator[BatchRequest]:
        window: deque = deque()
        for batch in self.inner.batches(epoch):
            self.advise(batch.positions)
            window.append(batch)
            if len(window) > self.AHEAD:
                yield window.popleft()
        yield from window


class BlockShuffleBatchSampler(EpochBatchSampler):
    """Batches of positions in a block-shuffled order; each batch's positions sorted in file order.

    ``shard_of[i]`` is position i's shard, ``local[i]`` its record there (default: positions in order).
    Per epoch: shards in a random order, ``buffer_shards`` at a time, positions shuffled within each buffer.
    Unshuffled: shards in order, records in file order. ``for_rank(r, w)``: rank r's contiguous slice of every
    shard's records (sequential reads, no record read by two ranks, rank counts within one per shard).
    """

    def __init__(
        self,
        shard_of,
        buffer_shards: int,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        *,
        local=None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        super().__init__(batch_size, drop_last, seed)
        self.shard_of = np.asarray(shard_of, dtype=np.int64)
        self.local = np.arange(len(self.shard_of)) if local is None else np.asarray(local, dtype=np.int64)
        self.buffer_shards, self.shuffle = int(buffer_shards), bool(shuffle)
        self.rank, self.world = int(rank), int(world)
        by_shard = np.lexsort((self.local, self.shard_of))  # shard, then file order
        self.file_rank = np.empty(len(by_shard), dtype=np.int64)  # each position's place in file order
        self.file_rank[by_shard] = np.arange(len(by_shard))
        _, starts = np.unique(self.shard_of[by_shard], return_index=True)
        groups = np.split(by_shard, starts[1:]) if len(by_shard) else []
        if self.world > 1:  # this rank's contiguous slice of each shard's records
            groups = [np.array_split(g, self.world)[self.rank] for g in groups]
        self.groups = groups  # positions of each shard holding any, in file order
        self.n = int(sum(len(g) for g in groups))  # positions per epoch (this rank's)

    def for_rank(self, rank: int, world: int) -> BlockShuffleBatchSampler:
        """Rank ``rank`` of ``world`` reads only its own slices; subclasses keep their own attributes."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        BlockShuffleBatchSampler.__init__(
            clone,
            self.shard_of,
            self.buffer_shards,
            self.batch_size,
            self.shuffle,
            self.drop_last,
            self.seed,
            local=self.local,
            rank=rank,
            world=world,
        )
        return clone

    @property
    def num_samples(self) -> int:
        return self.n

    def epoch_buffers(self, seed: int | None) -> list[np.ndarray]:
        """The epoch's buffers, each its positions in the order they are used; ``seed=None``: unshuffled."""
        b = self.buffer_shards
        if seed is None:
            return [np.concatenate(self.groups[g : g + b]) for g in range(0, len(self.groups), b)]
        rng = np.random.default_rng(seed)
        shard_order = rng.permutation(len(self.groups))
        return [
            rng.permutation(np.concatenate([self.groups[s] for s in shard_order[g : g + b]]))
            for g in range(0, len(shard_order), b)
        ]

    def epoch_order(self, seed: int | None) -> np.ndarray:
        """Every position once: shards in random order, shuffled within buffers of shards."""
        parts = self.epoch_buffers(seed)
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def buffers_of(self, epoch: int) -> list[np.ndarray]:
        return self.epoch_buffers(self.shuffle_seed(epoch) if self.shuffle else None)

    def batches(self, epoch: int) -> Iterator[BatchRequest]:
        order = self.batch_order(self.epoch_order(self.shuffle_seed(epoch) if self.shuffle else None))
        return chop(order, self.batch_size, self.drop_last, sort=False, epoch=epoch)

    def batch_order(self, order: np.ndarray) -> np.ndarray:
        """``order`` with each batch's positions sorted as their records lie in the files (one read per
        shard), in one sort for the epoch; unshuffled orders are left as they are."""
        if not self.shuffle or not len(order):
            return order
        keys, bs = self.file_rank[order], self.batch_size
        full = len(order) // bs * bs
        idx = np.empty(len(order), dtype=np.int64)
        per_batch = np.argsort(keys[:full].reshape(-1, bs), axis=1, kind="stable")
        idx[:full] = (per_batch + np.arange(0, full, bs)[:, None]).ravel()
        idx[full:] = full + np.argsort(keys[full:], kind="stable")
        return order[idx]


class EpochShuffle:
    """Per-item sampler (for plain torch Datasets): a uniform permutation of ``range(n)`` per epoch, a
    function of ``(seed, epoch)`` only; ``for_rank`` keeps positions r, r + W, ... of it (no padding).

    Why not torch's RandomSampler: it draws each epoch's permutation from the loader's generator, which the
    loader also draws worker seeds from -- once per epoch without ``persistent_workers`` but once per run
    with them -- so the order would depend on the worker settings, and a resumed run would have to replay
    every earlier draw."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.shuffle, self.epoch = int(n), int(seed), bool(shuffle), 0
        self.rank, self.world = int(rank), int(world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def for_rank(self, rank: int, world: int) -> EpochShuffle:
        return EpochShuffle(self.n, self.seed, self.shuffle, rank, world)

    @property
    def num_samples(self) -> int:
        return len(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return self.num_samples

    def order(self, epoch: int) -> np.ndarray:
        """This rank's positions of epoch ``epoch``, in order."""
        if not self.shuffle:
            return np.arange(self.rank, self.n, self.world, dtype=np.int64)
        import torch  # the permutation the project has always drawn (torch's randperm)

        generator = torch.Generator()
        generator.manual_seed(derive_seed(self.seed, "shuffle", epoch))
        return torch.randperm(self.n, generator=generator).numpy()[self.rank :: self.world]

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1  # runs at the first next(), not at iter()
        yield from self.order(epoch).tolist()


def shuffle_quality(order: np.ndarray) -> float:
    """How mixed an epoch order is: mean |step| between consecutive positions over a uniform
    shuffle's expected (n + 1) / 3 -- about 1.0 for a full shuffle, near 0 for sequential reads."""
    order = np.asarray(order, dtype=np.int64)
    if len(order) < 2:
        return 1.0
    return float(np.abs(np.diff(order)).mean() / ((len(order) + 1) / 3))
