"""``memmap``: every sample in one contiguous ``samples.npy``, read by rows -- cold or warm, any size.

    storage=memmap storage.io_threads=16   # on the command line
    ds = Dataset(root, spec, labels, ids)  # ds[i] -> (tensor, label); ds.__getitems__(idx) -> (x, y)

The writer preallocates ``samples.npy`` with ``np.lib.format.open_memmap`` and copies each chunk into
place, so an export never holds more than one chunk in RAM; in a parallel export each worker ``pwrite``s
its parts' rows into place (``RowsPart``).

Reading goes through ``RowReader`` (pipeline/data/readers/rows.py), opened lazily in the process that
reads: each DataLoader worker opens its own; pickling sends only paths, ids and labels. It never lets the
kernel read ahead on a shuffled pass -- a default memory map reads many times the data of a shuffled pass
larger than the page cache (docs/storage-formats.md) -- and it keeps a batch's missing rows in flight
together (``RWF_NOWAIT`` reads, then ``pread`` from ``storage.io_threads`` threads); once the page cache
holds the file it reads each batch with one fancy index on its own memory map, as fast as the plain memory
map. The batch sampler (``ReadAhead``) asks the kernel for each batch's rows two batches before the batch is
read, so a cold pass keeps about three batches of reads in flight.

Batched reads: ``read_into`` reads a whole batch (rows sorted, adjacent ones in one read) into the batch's
array in the order asked for. Its batch sampler (pipeline/data/sampling.py: ``ReadAhead`` around
``RandomBatchSampler``) yields each batch's positions sorted, so the read needs no reordering copy. Batch
membership stays uniformly random; only the order inside a batch is sorted, which no loss averaged over the
batch can see.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config.checks import at_least
from pipeline.config.schema import StorageConfig
from pipeline.data.integrity import IntegrityError
from pipeline.data.readers.files import npy_layout
from pipeline.data.readers.rows import RowReader
from pipeline.data.sampling import RandomBatchSampler, ReadAhead
from pipeline.data.storage.base import BatchedDataset, PartWriter, StorageFormat
from pipeline.data.storage.base import Writer as BaseWriter

SAMPLES = "samples.npy"


@dataclass
class MemmapConfig(StorageConfig):
    name: str = "memmap"
    io_threads: int = at_least(1, 16)  # read-time: threads waiting on a batch's rows the page cache misses


class RowsPart(PartWriter):
    """A worker's side of a Writer of one ``.npy`` of rows: ``pwrite``s a part's rows into place."""

    def __init__(self, path: Path, offset: int, row_bytes: int) -> None:
        self.path, self.offset, self.row_bytes = path, offset, row_bytes

    def write(self, first: int, x: np.ndarray, y: np.ndarray, args) -> None:
        data = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            at, view = 0, memoryview(data)
            while at < len(data):  # pwrite may write less than asked
                at += os.pwrite(fd, view[at:], self.offset + first * self.row_bytes + at)
        finally:
            os.close(fd)


class Writer(BaseWriter):
    def __init__(self, root: Path, spec, cfg=None) -> None:
        self.path = Path(root) / SAMPLES
        self.out = np.lib.format.open_memmap(
            self.path, mode="w+", dtype=np.dtype(spec.dtype), shape=(spec.num_samples, *spec.shape)
        )
        self.next_id, self.row_bytes = 0, spec.sample_bytes

    def part_writer(self) -> RowsPart:
        return RowsPart(self.path, int(self.out.offset), self.row_bytes)

    def write(self, x: np.ndarray, y: np.ndarray) -> None:
        self.out[self.next_id : self.next_id + len(x)] = x
        self.next_id += len(x)

    def close(self) -> None:
        self.out.flush()
        del self.out


class Dataset(BatchedDataset):
    def __init__(self, root: Path, spec, labels: np.ndarray, ids: np.ndarray, cfg=None) -> None:
        super().__init__(spec, labels, ids)
        self.path = Path(root) / SAMPLES
        offset, shape, dtype = npy_layout(self.path, spec.num_samples)
        if shape[1:] != tuple(spec.shape) or dtype != np.dtype(spec.dtype):
            raise IntegrityError(
                f"{self.path} holds {shape} {dtype}; the manifest says {spec.shape} {spec.dtype}"
            )
        threads = int(cfg.get("io_threads", 16)) if cfg is not None else 16
        self.reader = RowReader(self.path, offset, spec.sample_bytes, spec.num_samples, threads)

    @property
    def opened_pid(self) -> int | None:
        """Which process opened the file (each DataLoader worker opens its own)."""
        return self.reader.opened_pid

    def read_into(self, request, out: np.ndarray) -> None:
        self.reader.read(self.ids[request.positions], out=out.reshape(len(out), -1).view(np.uint8))

    def advise(self, positions: np.ndarray) -> None:
        """Start reading these positions' rows (a batch a few batches ahead): see ``ReadAhead``."""
        if not self.reader.mapped:  # warm (reading through the map): nothing to ask for
            self.reader.advise(np.sort(self.ids[positions]))

    def batch_sampler(self, batch_size: int, shuffle: bool, drop_last: bool, seed: int):
        return ReadAhead(RandomBatchSampler(len(self), batch_size, shuffle, drop_last, seed), self.advise)


class Memmap(StorageFormat):
    name = "memmap"
    config = MemmapConfig
    not_remote = (
        "it reads random rows of one large file: from a bucket every batch would be dozens of small ranged "
        "GETs, or the whole file copied to every machine"
    )
    read_options = ("io_threads",)

    def writer(self, root, spec, cfg) -> Writer:
        return Writer(root, spec, cfg)

    def dataset(self, root, spec, labels, ids, cfg, files=None) -> Dataset:
        return Dataset(root, spec, labels, ids, cfg)


FORMAT = Memmap()
