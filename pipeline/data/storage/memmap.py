"""``memmap``: every sample in one contiguous ``samples.npy``, read through a memory map.

    storage=memmap                         # on the command line
    ds = Dataset(root, spec, labels, ids)  # ds[i] -> (tensor, label); ds.__getitems__(idx) -> (x, y)

The writer preallocates ``samples.npy`` with ``np.lib.format.open_memmap`` and copies each chunk
into place, so an export never holds more than one chunk in RAM. The Dataset opens the memory map
lazily, in the process that reads: each DataLoader worker opens its own, forked or spawned, and
pickling sends only paths, ids and labels.

Batched reads: ``__getitems__`` reads a whole batch with one sorted fancy index and returns an
already collated ``(x, y)`` pair of tensors in the order asked for; the Dataset's ``collate_fn``
passes it through. Its ``batch_sampler`` hook (used by pipeline.training.loading) yields each batch's
indices sorted, so the read needs no reordering copy. Batch membership stays uniformly random;
only the order inside a batch is sorted, which no loss averaged over the batch can see.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pipeline.data.storage.batching import RandomBatchSampler, passthrough_collate, read_rows

SAMPLES = "samples.npy"


class Writer:
    def __init__(self, root: Path, spec, cfg=None) -> None:
        self.path = Path(root) / SAMPLES
        self.out = np.lib.format.open_memmap(
            self.path, mode="w+", dtype=np.dtype(spec.dtype), shape=(spec.num_samples, *spec.shape)
        )
        self.next_id = 0

    def write(self, x: np.ndarray, y: np.ndarray) -> None:
        self.out[self.next_id : self.next_id + len(x)] = x
        self.next_id += len(x)

    def close(self) -> None:
        self.out.flush()
        del self.out


def open_array(path: Path, spec) -> np.ndarray:
    """The file's samples as a read-only memory-mapped plain ndarray (cheaper to index than np.memmap)."""
    mm = np.load(path, mmap_mode="r", allow_pickle=False)
    want = (spec.num_samples, *spec.shape)
    if mm.shape != want or mm.dtype != np.dtype(spec.dtype):
        raise ValueError(f"{path} holds {mm.shape} {mm.dtype}; the manifest says {want} {spec.dtype}")
    return mm.view(np.ndarray)


class Dataset(torch.utils.data.Dataset):
    collate_fn = staticmethod(passthrough_collate)

    def __init__(self, root: Path, spec, labels: np.ndarray, ids: np.ndarray, cfg=None) -> None:
        self.path, self.spec = Path(root) / SAMPLES, spec
        self.ids = np.asarray(ids, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)[self.ids]
        self._array: np.ndarray | None = None
        self.opened_pid: int | None = None  # which process opened the map (workers open their own)

    @property
    def array(self) -> np.ndarray:
        if self._array is None or self.opened_pid != os.getpid():  # a forked worker reopens
            self._array = open_array(self.path, self.spec)
            self.opened_pid = os.getpid()
        return self._array

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_array"], state["opened_pid"] = None, None  # never pickle the map itself
        return state

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return torch.from_numpy(np.array(self.array[self.ids[i]])), int(self.labels[i])

    def __getitems__(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        x = read_rows(self.array, self.ids[idx])
        return torch.from_numpy(x), torch.from_numpy(self.labels[idx])

    def batch_sampler(self, batch_size: int, shuffle: bool, drop_last: bool, seed: int):
        return RandomBatchSampler(len(self), batch_size, shuffle, drop_last, seed)
