"""``shards``: samples in fixed-size shard files, read in large sequential buffers with a block shuffle.

    storage=shards storage.shard_size_mb=64 storage.shuffle_buffer_shards=4 storage.buffers=auto

Layout (``LAYOUT`` 2): ``shards/shard-00000.npy`` ... each a contiguous ``(k, *shape)`` array of
``samples_per_shard`` records (the last may hold fewer); ``shards/placement.npy`` the sample id of every
record, shard after shard; ``shards/index.json`` the files, their counts and the placement's seed. The
writer ``pwrite``s each chunk's samples to their records in the seeded placement (never more than a chunk in
RAM). In a parallel export the workers ``pwrite`` their parts' samples themselves (``RecordsPart``), to the
files the Writer created, the records of each part given by the Writer (``part_args``). Exports of layout 1
(samples in id order) have another fingerprint and are not reused; opened by path, they fail naming their
layout.

Reading -- buffers, the block shuffle, workers, torchrun ranks -- is what ``shards`` and ``encoded`` share:
pipeline/data/storage/sharded.py. Direct reads (per-item use, plots, a stock sampler) go through the
stream's memory maps with ``buffers=mapped``, else through ``RowReader``s (no readahead:
pipeline/data/readers/rows.py). ``shuffle_buffer_shards`` and ``buffers`` are read-time options: changing
them does not re-export.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config.checks import at_least, number
from pipeline.config.schema import StorageConfig
from pipeline.data.integrity import IntegrityError
from pipeline.data.readers.buffers import rows_at
from pipeline.data.readers.files import LOCAL, RecordFile, npy_layout, runs_of
from pipeline.data.readers.rows import RowReader
from pipeline.data.storage.base import PartWriter
from pipeline.data.storage.base import Writer as BaseWriter
from pipeline.data.storage.sharded import (
    PLACEMENT,
    OpenFiles,
    ShardBuffers,
    ShardedDataset,
    ShardedFormat,
    load_index,
    load_placement,
    placement,
    uncache,
)

FOLDER = "shards"
INDEX = "index.json"
LAYOUT = 2  # 2: records in a seeded random permutation of the sample ids (1: in id order)
MIB = 2**20


@dataclass
class ShardsConfig(StorageConfig):
    name: str = "shards"
    # MiB per shard file (at least one sample per shard)
    shard_size_mb: float = number(64.0, above=0.0, valid="must be > 0 (MiB per shard file), e.g. 64")
    shuffle_buffer_shards: int = at_least(1, 4)  # read-time: shards whose samples are shuffled together
    placement_seed: int = 0  # seeds the permutation placing samples in shards (mixes class-sorted sources)
    buffers: ShardBuffers = ShardBuffers.auto  # read-time: how a buffer of shards is held (sharded.py)
    # read-time, data in object storage: the local cache of shards is kept under this (+ one shard)
    cache_limit_mb: float = number(4096.0, above=0.0, valid="must be > 0 (MB of cached shards), e.g. 4096")


def samples_per_shard(shard_size_mb: float, sample_bytes: int) -> int:
    return max(1, int(shard_size_mb * MIB // max(sample_bytes, 1)))


def shard_name(s: int) -> str:
    return f"shard-{s:05d}.npy"


def put_records(
    files: OpenFiles, rows: np.ndarray, slots: np.ndarray, per_shard: int, offsets, row_bytes: int
):
    """``pwrite`` each of ``rows`` (bytes of one sample each) to its record ``slots[j]``, in file order."""
    for j in np.argsort(slots, kind="stable").tolist():
        s, local = divmod(int(slots[j]), per_shard)
        os.pwrite(files.fd(s), rows[j], offsets[s] + local * row_bytes)


class RecordsPart(PartWriter):
    """A worker's side of the Writer: ``pwrite``s a part's samples to their records (``args``: slots)."""

    def __init__(self, paths: list[Path], per_shard: int, offsets: list[int], row_bytes: int) -> None:
        self.paths, self.per_shard, self.offsets, self.row_bytes = paths, per_shard, offsets, row_bytes
        self.files: OpenFiles | None = None  # opened in the worker

    def __getstate__(self) -> dict:
        return {**self.__dict__, "files": None}

    def write(self, first: int, x: np.ndarray, y: np.ndarray, args) -> None:
        if self.files is None:
            self.files = OpenFiles(self.paths)
        rows = np.ascontiguousarray(x).reshape(len(x), -1).view(np.uint8)
        put_records(self.files, rows, np.asarray(args), self.per_shard, self.offsets, self.row_bytes)

    def __del__(self) -> None:
        if self.files is not None:
            self.files.close()


class Writer(BaseWriter):
    """Creates every shard file at its full size, then writes each sample to its record with ``pwrite``."""

    def __init__(self, root: Path, spec, cfg) -> None:
        self.folder = Path(root) / FOLDER
        self.folder.mkdir(parents=True)
        self.spec, self.row_bytes = spec, spec.sample_bytes
        self.per_shard = samples_per_shard(float(cfg.shard_size_mb), spec.sample_bytes)
        self.num_shards = -(-spec.num_samples // self.per_shard)
        self.seed = int(cfg.get("placement_seed", 0))
        self.order = placement(spec.num_samples, self.seed)
        self.slot_of = np.empty(spec.num_samples, dtype=np.int64)
        self.slot_of[self.order] = np.arange(spec.num_samples, dtype=np.int64)
        self.offsets = []
        for s in range(self.num_shards):
            out = np.lib.format.open_memmap(
                self.folder / shard_name(s),
                mode="w+",
                dtype=np.dtype(spec.dtype),
                shape=(self.count(s), *spec.shape),
            )
            self.offsets.append(int(out.offset))
            del out
            with open(self.folder / shard_name(s), "r+b") as fh:
                try:  # reserve the blocks now, so the random writes below still give contiguous files
                    os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
                except OSError:
                    pass
        self.files = OpenFiles([self.folder / shard_name(s) for s in range(self.num_shards)])
        self.next_id = 0

    def count(self, s: int) -> int:
        return min(self.per_shard, self.spec.num_samples - s * self.per_shard)

    def after_sync(self) -> None:
        """Called by the export once every file is on disk: the shards leave the page cache (``uncache``)."""
        uncache(self.files.paths)

    def write(self, x: np.ndarray, y: np.ndarray) -> None:
        rows = np.ascontiguousarray(x).reshape(len(x), -1).view(np.uint8)
        slots = self.slot_of[self.next_id : self.next_id + len(x)]
        put_records(self.files, rows, slots, self.per_shard, self.offsets, self.row_bytes)
        self.next_id += len(x)

    def part_writer(self) -> RecordsPart:
        return RecordsPart(self.files.paths, self.per_shard, self.offsets, self.row_bytes)

    def part_args(self, first: int, n: int) -> np.ndarray:
        """The records (slots) of samples ``first .. first + n - 1``."""
        return self.slot_of[first : first + n]

    def close(self) -> None:
        self.files.close()
        np.save(self.folder / PLACEMENT, self.order, allow_pickle=False)
        shards = [{"file": shard_name(s), "count": self.count(s)} for s in range(self.num_shards)]
        index = {
            "layout": LAYOUT,
            "samples_per_shard": self.per_shard,
            "num_samples": self.spec.num_samples,
            "placement": {"kind": "seeded random permutation", "seed": self.seed, "file": PLACEMENT},
            "shards": shards,
        }
        (self.folder / INDEX).write_text(json.dumps(index, indent=1))


def read_index(folder: Path, spec) -> tuple[dict, np.ndarray]:
    """The index and the placement (sample id of each record), checked against the manifest's spec."""
    path = folder / INDEX
    index = load_index(path, LAYOUT, "shards")
    files = [s["file"] for s in index["shards"]]
    counts = [int(s["count"]) for s in index["shards"]]
    per = int(index["samples_per_shard"])
    if (
        index["num_samples"] != spec.num_samples
        or sum(counts) != spec.num_samples
        or any(c != per for c in counts[:-1])
        or any(Path(f).name != f or not f.endswith(".npy") for f in files)
    ):
        raise IntegrityError(f"{path} does not match the manifest or names a bad file; delete the export")
    return index, load_placement(folder / PLACEMENT, spec.num_samples)


class Dataset(ShardedDataset):
    def __init__(self, root: Path, spec, labels: np.ndarray, ids: np.ndarray, cfg=None, files=None) -> None:
        super().__init__(spec, labels, ids)
        self.source = files if files is not None else LOCAL
        self.folder = Path(root) / FOLDER
        index, order = read_index(self.folder, spec)
        self.dtype, self.row_bytes = np.dtype(spec.dtype), spec.sample_bytes
        files = []
        for s in index["shards"]:
            path = self.folder / s["file"]
            offset, shape, dtype = npy_layout(path, int(s["count"]), self.source)
            if shape[1:] != tuple(spec.shape) or dtype != self.dtype:
                raise IntegrityError(
                    f"{path} holds {shape} {dtype}; the manifest says {spec.shape} {spec.dtype}"
                )
            files.append(RecordFile(path, offset, int(s["count"]), record_bytes=self.row_bytes))
        self.place(files, order, labels, ids, cfg)
        self._readers: dict[int, RowReader] = {}
        self._readers_pid: int | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_readers"], state["_readers_pid"] = {}, None
        return state

    @property
    def opened_pid(self) -> int | None:
        """Which process opened the files for direct reads (each DataLoader worker opens its own)."""
        return self.stream.opened_pid if self.buffers == "mapped" else self._readers_pid

    def _reader(self, s: int) -> RowReader:
        if self._readers_pid != os.getpid():  # a forked worker opens its own files
            self._readers, self._readers_pid = {}, os.getpid()
        reader = self._readers.get(s)
        if reader is None:
            f = self.files[s]
            local = self.source.open(f.path)  # a file in object storage: brought into the cache
            try:
                reader = RowReader(local, f.offset, self.row_bytes, f.count, threads=8)
                reader.open()  # its descriptor keeps the file readable once the source lets it go
            finally:
                self.source.close(f.path)
            self._readers[s] = reader
        return reader

    def from_buffer(self, data: np.ndarray, loc: np.ndarray, size: np.ndarray, positions, out) -> None:
        rows_at(data, loc, self.row_bytes, out.view(np.uint8))

    def from_files(self, positions: np.ndarray, out: np.ndarray) -> None:
        """Through the stream's memory maps with ``buffers=mapped``, else with ``RowReader``s (no
        readahead)."""
        shard, local = self.shard_of[positions], self.local[positions]
        if self.buffers == "mapped":
            self.stream.gather(shard, local, out=out)
            return
        rows = out.reshape(len(positions), -1).view(np.uint8)
        for s, a, b in runs_of(shard):
            self._reader(s).read(local[a:b], out=rows[a:b])


class Shards(ShardedFormat):
    name = "shards"
    config = ShardsConfig
    layout = LAYOUT
    writer_class = Writer
    dataset_class = Dataset


FORMAT = Shards()
