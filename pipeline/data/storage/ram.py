"""``ram``: one contiguous ``data.npy``, loaded whole into memory when the Dataset is built.

    pipeline storage=ram                     # fast per item, but memory grows with the data

The Writer streams chunks into ``data.npy`` (samples in id order, shape ``(n, *spec.shape)``); the
Dataset copies the samples of its ids into one in-memory array up front -- the approach that fails
when the data does not fit in RAM, kept so that users and ``python -m benchmarks.memory`` can see
the contrast with the out-of-core formats. The copy is read in sorted chunks through a read-only
memory map, so it never needs twice the split's size; the map is dropped afterwards. Workers forked
after the load share the array copy-on-write (nothing in it is a Python object, so reading it does
not copy pages).

Before loading, ``check_fits`` compares the bytes to load with the memory the job may still use
(pipeline.system.headroom: the cgroup limit minus what the job uses, and MemAvailable, whichever is
lower) and raises ``DoesNotFit`` naming both figures: the job calls it for train + val before building
either Dataset, and each Dataset for its own ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config.schema import StorageConfig
from pipeline.data.storage.base import BatchedDataset, StorageFormat
from pipeline.data.storage.base import Writer as BaseWriter
from pipeline.data.storage.memmap import RowsPart

DATA = "data.npy"
READ_CHUNK = 4096  # samples per read while loading
REMEDY = "Use storage=memmap or storage=shards, which read from disk and need not fit in memory."


@dataclass
class RamConfig(StorageConfig):
    name: str = "ram"


def check_fits(spec, num_samples: int) -> None:
    """Raise pipeline.system.headroom.DoesNotFit unless ``num_samples`` samples fit in memory now."""
    from pipeline.system.headroom import require

    need = int(num_samples) * spec.sample_bytes
    require(need, f"storage=ram would load {num_samples:,} samples of {spec.sample_bytes:,} bytes", REMEDY)


class Writer(BaseWriter):
    def __init__(self, root: Path, spec, cfg) -> None:
        self.path, self.spec, self.next_id = Path(root) / DATA, spec, 0
        self.data = np.lib.format.open_memmap(
            self.path, mode="w+", dtype=np.dtype(spec.dtype), shape=(spec.num_samples, *spec.shape)
        )

    def part_writer(self) -> RowsPart:
        """A parallel export's workers write their rows into ``data.npy`` themselves."""
        return RowsPart(self.path, int(self.data.offset), self.spec.sample_bytes)

    def write(self, x: np.ndarray, y: np.ndarray) -> None:
        end = self.next_id + len(x)
        if end > len(self.data):
            raise ValueError(f"{self.path}: more than the {len(self.data)} samples declared")
        self.data[self.next_id : end] = x
        self.next_id = end

    def close(self) -> None:
        self.data.flush()
        del self.data


class Dataset(BatchedDataset):
    def __init__(self, root: Path, spec, labels: np.ndarray, ids: np.ndarray, cfg=None) -> None:
        super().__init__(spec, labels, ids)
        path = Path(root) / DATA
        stored = np.load(path, mmap_mode="r", allow_pickle=False)
        want = (spec.num_samples, *spec.shape)
        if stored.shape != want or stored.dtype != np.dtype(spec.dtype):
            raise ValueError(f"{path} holds {stored.shape} {stored.dtype}; expected {want} {spec.dtype}")
        check_fits(spec, len(self.ids))
        self.x = np.empty((len(self.ids), *spec.shape), dtype=stored.dtype)
        order = np.argsort(self.ids, kind="stable")  # read the file front to back
        for start in range(0, len(order), READ_CHUNK):
            sel = order[start : start + READ_CHUNK]
            self.x[sel] = stored[self.ids[sel]]
        del stored

    def read_into(self, request, out: np.ndarray) -> None:
        np.take(self.x, request.positions, axis=0, out=out)


class Ram(StorageFormat):
    name = "ram"
    config = RamConfig
    not_remote = "it loads the whole split into memory: copy the data to a local folder instead"

    def writer(self, root, spec, cfg) -> Writer:
        return Writer(root, spec, cfg)

    def dataset(self, root, spec, labels, ids, cfg, files=None) -> Dataset:
        return Dataset(root, spec, labels, ids, cfg)

    def check_fits(self, spec, num_samples: int) -> None:
        check_fits(spec, num_samples)


FORMAT = Ram()
