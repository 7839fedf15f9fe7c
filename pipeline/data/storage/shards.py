"""``shards``: samples in fixed-size shard files, read in large sequential buffers with a block shuffle.

    storage=shards storage.shard_size_mb=64 storage.shuffle_buffer_shards=4 storage.buffers=auto

Layout (``LAYOUT`` 2): ``shards/shard-00000.npy`` ... each a contiguous ``(k, *shape)`` array of
``samples_per_shard`` records (the last may hold fewer); ``shards/placement.npy`` the sample id of every
record, shard after shard; ``shards/index.json`` the files, their counts and the placement's seed. The
export places samples in a random permutation seeded by ``storage.placement_seed``, so each shard holds a
random sample of the classes even when the source lists them class by class (image folders), and a buffer
of a few shards gives batches nearly as mixed as a full shuffle's. The writer ``pwrite``s each chunk's
samples to their records (never more than a chunk in RAM). Exports of layout 1 (samples in id order) have
another fingerprint and are not reused; opened by path, they fail naming their layout.

An epoch (``ShardBatches``, the Dataset's ``batch_sampler`` hook): shards in a random order,
``shuffle_buffer_shards`` at a time; each buffer is read whole by ``stream.BufferStream``, the next one read
while the current one is consumed, its records shuffled in memory and cut into batches (a batch may
straddle two buffers). The order is a function of (seed, epoch) only.

Why the sampler reads, not the Dataset: the DataLoader hands each batch to ``__getitems__`` in a worker
process, round robin, when there are workers; a reader in the Dataset would have every worker read every
buffer, or the order depend on the worker count. So the batch sampler (main process) owns the one reader
and yields, per batch, a ``stream.RecordBatch``: the batch's positions and its raw records, gathered from
the buffer. ``__getitems__`` turns it into tensors -- in the workers when there are workers, which is where
a format that decodes (``encoded``: variable-size records through the same ``BufferStream``) wants its
decode. Batches are the same for 0 or 2 workers and with ``loader.thread_prefetch``. ``__getitems__`` with
plain indices (per-item use, plots, a stock sampler) reads the records directly (``stream.RowReader``).

``storage.buffers``: ``memory`` copies each buffer into anonymous memory (counted in ``memory/used_mb``; at
most two buffers, 2 x ``shuffle_buffer_shards`` x ``shard_size_mb``) with large reads and drops the pages
behind the reader, for data larger than memory; ``mapped`` reads through memory maps with the next buffer
read ahead by the kernel, nothing copied or dropped, so data that fits stays in the page cache for the next
epoch; ``auto`` (default) is ``memory`` when the export is larger than half the memory the job may use (the
smaller of RAM and its cgroup's limit), else ``mapped``. ``shuffle_buffer_shards`` and ``buffers`` are
read-time options: changing them does not re-export.

Under torchrun (``for_rank``) rank r of W reads the r-th of W contiguous slices of each shard's records in
its split -- sequential reads, no byte read by two ranks, rank sample counts within one per shard -- and
shuffles its slices in buffers as above.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from pipeline.data.integrity import IntegrityError
from pipeline.data.storage.batching import EpochBatches, num_batches, passthrough_collate
from pipeline.data.storage.stream import (
    BufferStream,
    RecordBatch,
    RecordFile,
    RowReader,
    npy_layout,
    runs_of,
)
from pipeline.training.seeding import derive_seed

log = logging.getLogger(__name__)

FOLDER = "shards"
INDEX = "index.json"
PLACEMENT = "placement.npy"
LAYOUT = 2  # 2: records in a seeded random permutation of the sample ids (1: in id order)
READ_OPTIONS = ("shuffle_buffer_shards", "buffers")  # not part of the export's fingerprint
MIB = 2**20


def samples_per_shard(shard_size_mb: float, sample_bytes: int) -> int:
    return max(1, int(shard_size_mb * MIB // max(sample_bytes, 1)))


def shard_name(s: int) -> str:
    return f"shard-{s:05d}.npy"


def placement(num_samples: int, seed: int) -> np.ndarray:
    """The sample id of each record, shard after shard: a permutation seeded by ``seed`` (through
    ``derive_seed``, so it is not the permutation a split with the same seed draws)."""
    rng = np.random.default_rng(derive_seed(int(seed), "shards.placement"))
    return rng.permutation(int(num_samples)).astype(np.int64)


def inverse(order: np.ndarray) -> np.ndarray:
    """The record (slot) of each sample id, given the sample id of each record."""
    slot_of = np.empty(len(order), dtype=np.int64)
    slot_of[order] = np.arange(len(order), dtype=np.int64)
    return slot_of


class OpenFiles:
    """Write descriptors for many files, at most ``MAX_OPEN`` open at once (for a writer's ``pwrite``s)."""

    MAX_OPEN = 256

    def __init__(self, paths: list[Path]) -> None:
        self.paths, self.fds = list(paths), {}

    def fd(self, i: int) -> int:
        fd = self.fds.get(i)
        if fd is None:
            if len(self.fds) >= self.MAX_OPEN:
                self.close()
            fd = self.fds[i] = os.open(self.paths[i], os.O_WRONLY)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def uncache(paths) -> None:
    """Drop written (and synced) files from the page cache. Written in random order, their cached pages are
    small (4 KiB folios), and batches gathered through a memory map from those ran ~30% slower than from the
    large folios the kernel's readahead makes when the files are read back; so the first read does that."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_index(path: Path, layout: int, what: str) -> dict:
    """``index.json`` of a sharded export, checked to be of ``layout``; IntegrityError names the file."""
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise IntegrityError(f"{path} cannot be read: {err}; delete the export to re-export") from err
    if not isinstance(index, dict) or index.get("layout") != layout:
        found = index.get("layout", 1) if isinstance(index, dict) else None
        raise IntegrityError(
            f"{path} describes {what} of layout {found}; this version reads layout {layout}. "
            "Delete the export to re-export"
        )
    return index


def load_placement(path: Path, num_samples: int) -> np.ndarray:
    """The sample id of each record, checked to be a permutation of the ``num_samples`` ids."""
    try:
        order = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise IntegrityError(f"{path} cannot be read: {err}; delete the export") from err
    if (
        order.shape != (num_samples,)
        or order.dtype.kind not in "iu"
        or (num_samples and not (np.bincount(order, minlength=num_samples) == 1).all())
    ):
        raise IntegrityError(f"{path} is not a permutation of the {num_samples} sample ids")
    return order.astype(np.int64)


class Writer:
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
        x = np.ascontiguousarray(x)
        slots = self.slot_of[self.next_id : self.next_id + len(x)]
        rows = x.reshape(len(x), -1).view(np.uint8)
        for j in np.argsort(slots, kind="stable").tolist():  # file order within the chunk
            s, local = divmod(int(slots[j]), self.per_shard)
            os.pwrite(self.files.fd(s), rows[j], self.offsets[s] + local * self.row_bytes)
        self.next_id += len(x)

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


def memory_room_bytes() -> int:
    """The memory this job may fill, page cache included: RAM, or its cgroup's limit where lower."""
    import psutil

    from pipeline.system.cgroups import memory_limit

    total = int(psutil.virtual_memory().total)
    limit = memory_limit()
    return min(total, limit) if limit is not None else total


def buffer_mode(setting, data_bytes: int) -> str:
    """``storage.buffers``: ``auto`` is ``memory`` when the export is larger than half the memory the job may
    use (it cannot stay cached across epochs anyway), else ``mapped``."""
    setting = str(setting)
    if setting == "auto":
        return "memory" if data_bytes > memory_room_bytes() // 2 else "mapped"
    return setting


class Placed(torch.utils.data.Dataset):
    """What ``shards`` and ``encoded`` share: the records of samples placed in shard files in a seeded
    permutation, read in buffers by ``ShardBatches`` (or directly, ``read``) and turned into a batch of
    tensors by the format's ``tensors(RecordBatch)`` -- in the DataLoader workers when there are workers.

    A format's ``__init__`` checks its files, then calls ``place``; it defines ``tensors`` and
    ``read_sorted(positions)`` (the records of positions in file order, as a ``RecordBatch``)."""

    collate_fn = staticmethod(passthrough_collate)
    NAME = "shards"  # for messages

    def place(self, files: list[RecordFile], order: np.ndarray, labels, ids, cfg) -> None:
        """Positions over the sample ids ``ids``, in ``files`` that hold the records of the sample ids
        ``order``, shard after shard; ``cfg``: read-time options (``shuffle_buffer_shards``, ``buffers``)."""
        self.files = files
        counts = np.array([f.count for f in files], dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)  # first slot of each shard
        self.ids = np.asarray(ids, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)[self.ids]
        slots = inverse(order)[self.ids]
        self.shard_of = np.searchsorted(starts, slots, side="right") - 1  # shard of each position
        self.local = slots - starts[self.shard_of]  # its record in that shard
        self.slot = slots  # its record among all, shard after shard (file order)
        cfg = cfg if cfg is not None else {}
        self.buffer_shards = int(cfg.get("shuffle_buffer_shards", 4))
        spans = [int(f.spans(np.array([f.count - 1]))[1][0]) - f.offset if f.count else 0 for f in files]
        self.buffers = buffer_mode(cfg.get("buffers", "auto"), sum(spans))
        held = 2 * self.buffer_shards * max(spans, default=0)
        if self.buffers == "memory" and held > memory_room_bytes() // 2:
            log.warning(
                "%s: two buffers of %d shards hold %.0f MB, over half the %.0f MB this job may use; "
                "lower storage.shuffle_buffer_shards or export smaller shards (storage.shard_size_mb)",
                self.NAME,
                self.buffer_shards,
                held / 1e6,
                memory_room_bytes() / 1e6,
            )
        self.stream = BufferStream(files, mode=self.buffers)

    @property
    def opened_pid(self) -> int | None:
        """Which process opened the files for direct reads (each DataLoader worker opens its own)."""
        return self.stream.opened_pid

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, positions: np.ndarray) -> RecordBatch:
        """The records of ``positions`` read directly from their shards, in the order asked."""
        slots = self.slot[positions]
        if bool((slots[1:] >= slots[:-1]).all()):
            return self.read_sorted(positions)
        order = np.argsort(slots, kind="stable")
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return self.read_sorted(positions[order]).take(back)

    def __getitem__(self, i: int):
        x, y = self.tensors(self.read(np.asarray([int(i)], dtype=np.int64)))
        return x[0], int(y[0])

    def __getitems__(self, batch):
        if isinstance(batch, RecordBatch):  # from ShardBatches: the records were read by the sampler
            return self.tensors(batch)
        return self.tensors(self.read(np.asarray(batch, dtype=np.int64)))

    def batch_sampler(self, batch_size: int, shuffle: bool, drop_last: bool, seed: int):
        return ShardBatches(
            self.shard_of,
            self.buffer_shards,
            batch_size,
            shuffle,
            drop_last,
            seed,
            local=self.local,
            stream=self.stream,
        )


class Dataset(Placed):
    # build_loader logs this when loader.num_workers > 0: the batches are read by the batch sampler's
    # thread in the main process, and a worker has nothing to do but copy them (docs/storage-formats.md)
    WORKERS_HINT = (
        "shards: its buffers are read by a thread in the main process, so DataLoader workers only copy "
        "each batch through a pipe (measured 15-24x slower warm and 2-4x slower out of core with 2 "
        "workers on 2 cores); loader.num_workers=0, with loader.thread_prefetch to overlap the training "
        "step, is faster"
    )

    def __init__(self, root: Path, spec, labels: np.ndarray, ids: np.ndarray, cfg=None) -> None:
        self.folder, self.spec = Path(root) / FOLDER, spec
        index, order = read_index(self.folder, spec)
        self.dtype, self.row_bytes = np.dtype(spec.dtype), spec.sample_bytes
        files = []
        for s in index["shards"]:
            path = self.folder / s["file"]
            offset, shape, dtype = npy_layout(path, int(s["count"]))
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

    def tensors(self, batch: RecordBatch):
        x = torch.from_numpy(batch.records.view(self.dtype).reshape(len(batch), *self.spec.shape))
        return x, torch.from_numpy(self.labels[batch.positions])

    def _reader(self, s: int) -> RowReader:
        if self._readers_pid != os.getpid():  # a forked worker opens its own files
            self._readers, self._readers_pid = {}, os.getpid()
        reader = self._readers.get(s)
        if reader is None:
            f = self.files[s]
            reader = self._readers[s] = RowReader(f.path, f.offset, self.row_bytes, f.count, threads=8)
        return reader

    def read_sorted(self, positions: np.ndarray) -> RecordBatch:
        """Records of ``positions`` (in file order): through the stream's memory maps with ``buffers=mapped``
        (where ``ShardBatches`` leaves the reads to ``__getitems__``), else with ``RowReader``s (no
        readahead)."""
        shard, local = self.shard_of[positions], self.local[positions]
        if self.buffers == "mapped":
            return RecordBatch(positions, self.stream.gather(shard, local))
        rows = np.empty((len(positions), self.row_bytes), dtype=np.uint8)
        for s, a, b in runs_of(shard):
            self._reader(s).read(local[a:b], out=rows[a:b])
        return RecordBatch(positions, rows)


class BlockShuffleBatchSampler(EpochBatches):
    """Batches of positions in a block-shuffled order; each batch's positions sorted.

    ``shard_of[i]`` is position i's shard, ``local[i]`` its record there (default: positions in order).
    Per epoch: shards in a random order, ``buffer_shards`` at a time, positions shuffled within each buffer.
    Unshuffled: shards in order, records in file order. ``for_rank(r, w)``: rank r's slice of every shard.
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
    ):
        self.shard_of = np.asarray(shard_of, dtype=np.int64)
        self.local = np.arange(len(self.shard_of)) if local is None else np.asarray(local, dtype=np.int64)
        self.buffer_shards, self.batch_size = int(buffer_shards), int(batch_size)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, int(seed)
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
        """This sampler for rank ``rank`` of ``world`` (torchrun): every rank reads only its own slices."""
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
        """Positions this sampler yields per epoch (before drop_last)."""
        return self.n

    def __len__(self) -> int:
        return num_batches(self.n, self.batch_size, self.drop_last)

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

    def _epoch_seed(self) -> int | None:
        return self.next_epoch_seed() if self.shuffle else None

    def __iter__(self):
        order = self.batch_order(self.epoch_order(self._epoch_seed()))
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for start in range(0, stop, self.batch_size):
            yield order[start : start + self.batch_size]

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


class ShardBatches(BlockShuffleBatchSampler):
    """``BlockShuffleBatchSampler`` that reads its buffers with ``stream``: with ``memory`` buffers each batch
    is a ``RecordBatch`` carrying its records; with ``mapped`` ones it is the positions (in file order), which
    ``__getitems__`` reads from its own maps -- in the workers when there are workers -- while this asks the
    kernel to read the next buffer ahead."""

    def __init__(self, *args, stream: BufferStream, **kwargs):
        super().__init__(*args, **kwargs)
        self.stream = stream

    def __iter__(self):
        buffers = self.epoch_buffers(self._epoch_seed())
        loads = self.stream.load((self.shard_of[b], self.local[b]) for b in buffers)
        try:
            if self.stream.mode == "mapped":
                yield from self._positions(buffers, loads)
            else:
                yield from self._records(buffers, loads)
        finally:
            loads.close()

    def _positions(self, buffers: list, loads):
        order = self.batch_order(np.concatenate(buffers) if buffers else np.empty(0, dtype=np.int64))
        ends = np.cumsum([len(b) for b in buffers])
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        advanced = 0  # buffers handed out by ``loads`` (each one advises the kernel of the next)
        for start in range(0, stop, self.batch_size):
            last = min(start + self.batch_size, len(order)) - 1
            while advanced < len(buffers) and (advanced == 0 or ends[advanced - 1] <= last):
                next(loads)
                advanced += 1
            yield order[start : start + self.batch_size]

    def _batch(self, got: RecordBatch) -> RecordBatch:
        """A batch in file order (as the plain sampler's batches) when shuffled."""
        if self.shuffle:
            return got.take(np.argsort(self.file_rank[got.positions], kind="stable"))
        return got

    def _records(self, buffers: list, loads):
        bs = self.batch_size
        pending = None  # a batch begun in the buffer before
        for positions, buf in zip(buffers, loads):
            i = 0
            if pending is not None:
                i = min(bs - len(pending), len(positions))
                pending = pending.join(buf.batch(positions[:i], np.arange(i)))
                if len(pending) == bs:
                    yield self._batch(pending)
                    pending = None
            while i + bs <= len(positions):
                idx = np.arange(i, i + bs)
                if self.shuffle:  # in file order: fetch the records in that order
                    idx = idx[np.argsort(self.file_rank[positions[idx]], kind="stable")]
                yield buf.batch(positions[idx], idx)
                i += bs
            if i < len(positions):
                pending = buf.batch(positions[i:], np.arange(i, len(positions)))
            buf.release()
        if pending is not None and not self.drop_last:
            yield self._batch(pending)
