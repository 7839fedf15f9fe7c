"""``shards``: samples packed into fixed-size shard files, read with a block shuffle.

    storage=shards storage.shard_size_mb=64 storage.shuffle_buffer_shards=4

Layout: ``shards/shard-00000.npy`` ... each a contiguous ``(k, *shape)`` array holding
``samples_per_shard`` consecutive samples (the last may hold fewer), plus ``shards/index.json``
saying which samples each file holds. The writer fills one shard at a time from the source's
chunks (never more than a chunk in RAM).

Reading: a map-style Dataset (per item and batched ``__getitems__``; each process opens the shard
maps it needs lazily) whose ``batch_sampler`` hook gives pipeline.training.loading a
``BlockShuffleBatchSampler``: per epoch it shuffles the shard order, then the samples inside each
group of ``shuffle_buffer_shards`` consecutive shards of that order, so a pass reads a few shards at
a time -- mostly sequential when the data is on a slow disk and larger than the page cache -- and
still visits every sample exactly once. ``batching.shuffle_quality(order)`` rates an order: the mean
|index step| between consecutive samples relative to a uniform shuffle's (1.0 = as mixed as a full
shuffle, 0 = sequential). ``shuffle_buffer_shards`` is a read-time option: changing it does not
re-export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from pipeline.data.storage.batching import EpochBatches, chop, num_batches, passthrough_collate

FOLDER = "shards"
INDEX = "index.json"
READ_OPTIONS = ("shuffle_buffer_shards",)  # not part of the export's fingerprint
MIB = 2**20


def samples_per_shard(shard_size_mb: float, sample_bytes: int) -> int:
    return max(1, int(shard_size_mb * MIB // max(sample_bytes, 1)))


def shard_name(s: int) -> str:
    return f"shard-{s:05d}.npy"


class Writer:
    def __init__(self, root: Path, spec, cfg) -> None:
        self.folder = Path(root) / FOLDER
        self.folder.mkdir(parents=True)
        self.spec = spec
        self.per_shard = samples_per_shard(float(cfg.shard_size_mb), spec.sample_bytes)
        self.num_shards = -(-spec.num_samples // self.per_shard)
        self.shard, self.out, self.filled = -1, None, 0

    def _next_shard(self) -> None:
        if self.out is not None:
            self.out.flush()
        self.shard += 1
        count = min(self.per_shard, self.spec.num_samples - self.shard * self.per_shard)
        self.out = np.lib.format.open_memmap(
            self.folder / shard_name(self.shard),
            mode="w+",
            dtype=np.dtype(self.spec.dtype),
            shape=(count, *self.spec.shape),
        )
        self.filled = 0

    def write(self, x: np.ndarray, y: np.ndarray) -> None:
        done = 0
        while done < len(x):
            if self.out is None or self.filled == len(self.out):
                self._next_shard()
            take = min(len(x) - done, len(self.out) - self.filled)
            self.out[self.filled : self.filled + take] = x[done : done + take]
            self.filled += take
            done += take

    def close(self) -> None:
        if self.out is not None:
            self.out.flush()
            self.out = None
        shards = [
            {
                "file": shard_name(s),
                "start": s * self.per_shard,
                "count": min(self.per_shard, self.spec.num_samples - s * self.per_shard),
            }
            for s in range(self.shard + 1)
        ]
        index = {"samples_per_shard": self.per_shard, "num_samples": self.spec.num_samples, "shards": shards}
        (self.folder / INDEX).write_text(json.dumps(index, indent=1))


class Dataset(torch.utils.data.Dataset):
    collate_fn = staticmethod(passthrough_collate)

    def __init__(self, root: Path, spec, labels: np.ndarray, ids: np.ndarray, cfg=None) -> None:
        self.folder, self.spec = Path(root) / FOLDER, spec
        index = json.loads((self.folder / INDEX).read_text())
        self.per_shard = int(index["samples_per_shard"])
        self.files = [s["file"] for s in index["shards"]]
        if index["num_samples"] != spec.num_samples or any(
            Path(f).name != f or not f.endswith(".npy") for f in self.files
        ):
            raise ValueError(f"{self.folder / INDEX} does not match the manifest or names a bad file")
        self.ids = np.asarray(ids, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)[self.ids]
        self.shard_of = self.ids // self.per_shard  # shard of each position
        self.buffer_shards = int(cfg.get("shuffle_buffer_shards", 4)) if cfg is not None else 4
        self._arrays: dict[int, np.ndarray] = {}
        self.opened_pid: int | None = None

    def _array(self, s: int) -> np.ndarray:
        if self.opened_pid != os.getpid():  # a forked worker opens its own maps
            self._arrays, self.opened_pid = {}, os.getpid()
        arr = self._arrays.get(s)
        if arr is None:
            mm = np.load(self.folder / self.files[s], mmap_mode="r", allow_pickle=False)
            if mm.shape[1:] != tuple(self.spec.shape) or mm.dtype != np.dtype(self.spec.dtype):
                raise ValueError(f"{self.folder / self.files[s]} holds {mm.shape} {mm.dtype}")
            arr = self._arrays[s] = mm.view(np.ndarray)
        return arr

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"], state["opened_pid"] = {}, None  # never pickle the maps
        return state

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        row = int(self.ids[i])
        s = row // self.per_shard
        return torch.from_numpy(np.array(self._array(s)[row - s * self.per_shard])), int(self.labels[i])

    def __getitems__(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        rows = self.ids[idx]
        order = None
        if len(rows) > 1 and not bool(np.all(rows[1:] >= rows[:-1])):
            order = np.argsort(rows, kind="stable")
            rows = rows[order]
        shard = rows // self.per_shard
        local = rows - shard * self.per_shard
        out = np.empty((len(rows), *self.spec.shape), dtype=np.dtype(self.spec.dtype))
        cuts = [0, *(np.flatnonzero(shard[1:] != shard[:-1]) + 1).tolist(), len(rows)]
        for a, b in zip(cuts[:-1], cuts[1:]):
            # 'clip' makes take write straight into out (rows are valid: they come from self.ids)
            np.take(self._array(int(shard[a])), local[a:b], axis=0, out=out[a:b], mode="clip")
        if order is not None:
            x = np.empty_like(out)
            x[order] = out
            out = x
        return torch.from_numpy(out), torch.from_numpy(self.labels[idx])

    def batch_sampler(self, batch_size: int, shuffle: bool, drop_last: bool, seed: int):
        return BlockShuffleBatchSampler(
            self.shard_of, self.buffer_shards, batch_size, shuffle, drop_last, seed
        )


class BlockShuffleBatchSampler(EpochBatches):
    """Batches of a block-shuffled order of positions; each batch's indices sorted (one read per shard)."""

    def __init__(
        self, shard_of, buffer_shards: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0
    ):
        self.shard_of = np.asarray(shard_of, dtype=np.int64)
        self.n = len(self.shard_of)
        self.buffer_shards, self.batch_size = int(buffer_shards), int(batch_size)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, int(seed)
        by_shard = np.argsort(self.shard_of, kind="stable")
        shards, starts = np.unique(self.shard_of[by_shard], return_index=True)
        self.groups = np.split(by_shard, starts[1:])  # positions of each shard holding any

    def __len__(self) -> int:
        return num_batches(len(self.shard_of), self.batch_size, self.drop_last)

    def epoch_order(self, seed: int) -> np.ndarray:
        """Every position once: shards in random order, shuffled within buffers of shards."""
        rng = np.random.default_rng(seed)
        shard_order = rng.permutation(len(self.groups))
        parts = []
        for g in range(0, len(shard_order), self.buffer_shards):
            buffer = np.concatenate([self.groups[s] for s in shard_order[g : g + self.buffer_shards]])
            parts.append(rng.permutation(buffer))
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def __iter__(self):
        if self.shuffle:
            order = self.epoch_order(self.next_epoch_seed())
        else:
            order = np.arange(len(self.shard_of), dtype=np.int64)
        yield from chop(order, self.batch_size, self.drop_last, sort=self.shuffle)
