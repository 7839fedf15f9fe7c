"""What ``shards`` and ``encoded`` share: samples placed in shard files in a seeded permutation, read in
sequential buffers with a block shuffle, each batch gathered straight from the buffer it lies in.

    class Dataset(ShardedDataset):         # a format's Dataset: checks its files, then
        self.place(files, order, labels, ids, cfg)
        def from_buffer(self, data, loc, size, positions, out): ...   # records of a buffer into samples
        def from_files(self, positions, out): ...          # records read directly (positions in file order)

**Placement.** The export places samples in the shard files in a random permutation seeded by
``storage.placement_seed`` (``placement``), so each shard holds a random sample of the classes even when the
source lists them class by class (image folders), and a buffer of a few shards gives batches nearly as mixed
as a full shuffle's. ``placement.npy`` records the sample id of every record, shard after shard.

**An epoch** (``ShardBatches``, the Dataset's batch sampler): shards in a random order,
``shuffle_buffer_shards`` at a time (pipeline/data/sampling.py: ``BlockShuffleBatchSampler``, a function of
(seed, epoch) only); each buffer is read whole by ``BufferStream`` (pipeline/data/readers/buffers.py), the
next one read while the current one is consumed, its records shuffled in memory and cut into batches (a
batch may straddle two buffers). Each batch is a ``BufferedBatch``: its positions and, per sample, the buffer
and the byte range of its record -- a few hundred bytes, whichever process reads it. ``read_into`` copies (or
decodes) the records from the buffer into the batch; ``storage.buffers=memory`` buffers live in memory the
DataLoader workers share (``share_with_workers``), so the main process reads each buffer once and the workers
gather and decode their batches from it. With ``mapped`` buffers a batch is only its positions, read from the
files' memory maps by whichever process reads it, while the sampler asks the kernel to read the next buffer
ahead. Batches are the same for any number of workers and with thread prefetch.

``storage.buffers``: ``memory`` holds each buffer in anonymous (or, with workers, shared) memory, counted in
``memory/used_mb`` (at most two buffers of ``shuffle_buffer_shards`` shards), with large reads and the pages
dropped behind the reader, for data larger than memory; ``mapped`` reads through memory maps, nothing copied
or dropped, so data that fits stays in the page cache for the next epoch; ``auto`` (default) is ``memory``
when the export is larger than half the memory the job may use (pipeline.system.headroom.memory_room), else
``mapped``. Under torchrun (``for_rank``) rank r of W reads the r-th of W contiguous slices of each shard's
records -- sequential reads, no byte read by two ranks.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from pipeline.config.schema import Choice
from pipeline.data.integrity import IntegrityError
from pipeline.data.readers.buffers import BufferPool, BufferStream, copy_records
from pipeline.data.readers.files import RecordFile, runs_of
from pipeline.data.sampling import BatchRequest, BlockShuffleBatchSampler
from pipeline.data.storage.base import BatchedDataset, StorageFormat, reader_index
from pipeline.seeds import derive_seed

log = logging.getLogger(__name__)

PLACEMENT = "placement.npy"
DEPTH = 2  # memory buffers held: the one consumed and the one read ahead


class ShardBuffers(Choice):
    auto = "auto"  # memory when the export is larger than half the memory the job may use, else mapped
    memory = "memory"  # copied into anonymous memory with large reads; pages dropped from the cache behind
    mapped = "mapped"  # read through memory maps, read ahead by the kernel; pages stay cached


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
    small (4 KiB folios), and batches gathered through a memory map from those ran slower than from the
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


def buffer_mode(setting, data_bytes: int) -> str:
    """``storage.buffers``: ``auto`` is ``memory`` when the export is larger than half the memory the job may
    use (it cannot stay cached across epochs anyway), else ``mapped``."""
    from pipeline.system.headroom import memory_room

    setting = str(setting)
    if setting == "auto":
        return "memory" if data_bytes > memory_room() // 2 else "mapped"
    return setting


INLINE = -1  # a BufferedBatch sample whose record the batch carries itself


class BufferedBatch(BatchRequest):
    """A batch whose records lie in memory buffers: per sample, the buffer (``slots``) and the byte range of
    its record there (``loc``, ``size``). A batch that straddles buffers carries the records of its samples
    from the buffers before the last one itself (``inline``; their slot is ``INLINE``), so that no batch
    holds more than one buffer and two buffers always suffice."""

    __slots__ = ("slots", "loc", "size", "inline")

    def __init__(self, positions, epoch: int, slots, loc, size, inline=None) -> None:
        super().__init__(positions, epoch)
        self.slots = np.asarray(slots, dtype=np.int64)
        self.loc = np.asarray(loc, dtype=np.int64)
        self.size = np.asarray(size, dtype=np.int64)
        self.inline = inline

    def __reduce__(self):  # __slots__ classes pickle through this (to DataLoader workers)
        return (BufferedBatch, (self.positions, self.epoch, self.slots, self.loc, self.size, self.inline))

    def part(self, a: int, b: int) -> BufferedBatch:
        return BufferedBatch(
            self.positions[a:b], self.epoch, self.slots[a:b], self.loc[a:b], self.size[a:b], self.inline
        )


class ShardedDataset(BatchedDataset):
    """The Dataset base of ``shards`` and ``encoded`` (module docstring). A format's ``__init__`` checks its
    files, then calls ``place``; it defines ``from_buffer`` and ``from_files``."""

    NAME = "shards"  # for messages

    def place(self, files: list[RecordFile], order: np.ndarray, labels, ids, cfg) -> None:
        """Positions over the sample ids ``ids``, in ``files`` that hold the records of the sample ids
        ``order``, shard after shard; ``cfg``: read-time options (``shuffle_buffer_shards``, ``buffers``)."""
        self.files = files
        counts = np.array([f.count for f in files], dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)  # first slot of each shard
        slots = inverse(order)[self.ids]
        self.shard_of = np.searchsorted(starts, slots, side="right") - 1  # shard of each position
        self.local = slots - starts[self.shard_of]  # its record in that shard
        self.slot = slots  # its record among all, shard after shard (file order)
        cfg = cfg if cfg is not None else {}
        self.buffer_shards = int(cfg.get("shuffle_buffer_shards", 4))
        self.spans = [int(f.spans(np.array([f.count - 1]))[1][0]) - f.offset if f.count else 0 for f in files]
        source = self.source  # a subclass sets it: the local disk, or object storage
        # data in object storage streams through memory buffers: a map would need every shard local
        self.buffers = "memory" if source.remote else buffer_mode(cfg.get("buffers", "auto"), sum(self.spans))
        self.stream = BufferStream(files, mode=self.buffers, depth=DEPTH, source=source)
        held = DEPTH * self.buffer_bytes()
        from pipeline.system.headroom import memory_room

        if self.buffers == "memory" and held > memory_room() // 2:
            log.warning(
                "%s: two buffers of %d shards hold %.0f MB, over half the %.0f MB this job may use; "
                "lower storage.shuffle_buffer_shards or export smaller shards (storage.shard_size_mb)",
                self.NAME,
                self.buffer_shards,
                held / 1e6,
                memory_room() / 1e6,
            )

    def buffer_bytes(self) -> int:
        """The most one buffer can hold: its ``shuffle_buffer_shards`` largest shards, whole."""
        return int(sum(sorted(self.spans, reverse=True)[: self.buffer_shards]))

    def share_with_workers(self, num_workers: int) -> None:
        """``memory`` buffers in shared memory (allocated now, before the workers start), so the main
        process reads each buffer once and every worker gathers its batches from it."""
        if self.buffers != "memory" or num_workers < 1:
            return
        import torch

        nbytes = max(self.buffer_bytes(), 1)
        data = [torch.empty(nbytes, dtype=torch.uint8).share_memory_() for _ in range(DEPTH)]
        issued = torch.zeros(DEPTH, dtype=torch.int64).share_memory_()
        done = torch.zeros((num_workers + 1, DEPTH), dtype=torch.int64).share_memory_()
        views = [d.numpy() for d in data]
        owners = (data, issued, done)
        self.stream.pool = BufferPool(views, issued.numpy(), done.numpy(), fixed=True, owners=owners)

    @property
    def opened_pid(self) -> int | None:
        """Which process opened the files for direct reads (each DataLoader worker opens its own)."""
        return self.stream.opened_pid

    def from_buffer(
        self, data: np.ndarray, loc: np.ndarray, size: np.ndarray, positions: np.ndarray, out
    ) -> None:
        """Samples ``out`` of ``positions`` from their records at ``loc``/``size`` of ``data`` (a memory
        buffer, or a batch's own records)."""
        raise NotImplementedError

    def from_files(self, positions: np.ndarray, out: np.ndarray) -> None:
        """Samples ``out`` of ``positions`` (in file order), read directly from the shard files."""
        raise NotImplementedError

    def read_into(self, request: BatchRequest, out: np.ndarray) -> None:
        if isinstance(request, BufferedBatch):
            pool = self.stream.pool
            for slot, a, b in runs_of(request.slots):
                data = request.inline if slot == INLINE else pool.data[slot]
                self.from_buffer(data, request.loc[a:b], request.size[a:b], request.positions[a:b], out[a:b])
            return
        positions = request.positions
        slots = self.slot[positions]
        if bool((slots[1:] >= slots[:-1]).all()):
            self.from_files(positions, out)
            return
        order = np.argsort(slots, kind="stable")
        tmp = np.empty_like(out)
        self.from_files(positions[order], tmp)
        out[order] = tmp

    def release(self, request: BatchRequest) -> None:
        """A buffered batch is read: the buffers it held may be reused (by this reader's count)."""
        if isinstance(request, BufferedBatch):
            reader = reader_index()
            for slot in np.unique(request.slots).tolist():
                if slot != INLINE:
                    self.stream.pool.done(slot, reader)

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


class ShardedFormat(StorageFormat):
    """What the formats of shard files declare alike: their read-time options, that they stream from object
    storage, and their module's ``Writer`` and ``Dataset`` classes (``writer_class``, ``dataset_class``)."""

    read_options = ("shuffle_buffer_shards", "buffers", "cache_limit_mb")
    remote = True
    writer_class: type
    dataset_class: type

    def writer(self, root, spec, cfg):
        return self.writer_class(root, spec, cfg)

    def dataset(self, root, spec, labels, ids, cfg, files=None):
        return self.dataset_class(root, spec, labels, ids, cfg, files)


class ShardBatches(BlockShuffleBatchSampler):
    """``BlockShuffleBatchSampler`` that reads its buffers with ``stream``: with ``memory`` buffers each batch
    is a ``BufferedBatch`` (its records' places in the buffers); with ``mapped`` ones it is the positions (in
    file order), which ``read_into`` reads from its own maps -- in the workers when there are workers --
    while this asks the kernel to read the next buffer ahead."""

    def __init__(self, *args, stream: BufferStream, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stream = stream

    @property
    def replicable(self) -> bool:
        """Mapped buffers are read by whoever reads a batch; memory ones by this process's reader thread."""
        return self.stream.mode == "mapped"

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's positions in batch order, computed (``batches`` reads the buffers)."""
        return self.batch_order(self.epoch_order(self.shuffle_seed(epoch) if self.shuffle else None))

    def batches(self, epoch: int):
        buffers = self.buffers_of(epoch)
        loads = self.stream.load((self.shard_of[b], self.local[b]) for b in buffers)
        try:
            if self.stream.mode == "mapped":
                yield from self._positions(buffers, loads, epoch)
            else:
                yield from self._records(buffers, loads, epoch)
        finally:
            loads.close()

    def _positions(self, buffers: list, loads, epoch: int):
        order = self.batch_order(np.concatenate(buffers) if buffers else np.empty(0, dtype=np.int64))
        ends = np.cumsum([len(b) for b in buffers])
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        advanced = 0  # buffers handed out by ``loads`` (each one advises the kernel of the next)
        for start in range(0, stop, self.batch_size):
            last = min(start + self.batch_size, len(order)) - 1
            while advanced < len(buffers) and (advanced == 0 or ends[advanced - 1] <= last):
                next(loads)
                advanced += 1
            yield BatchRequest(order[start : start + self.batch_size], epoch)

    def _batch(self, epoch: int, buf, positions, idx, carried=None) -> BufferedBatch:
        """A batch of ``positions`` whose records are request items ``idx`` of ``buf``, after ``carried``
        (positions, records, loc, size) taken from earlier buffers; its samples in file order when shuffled
        (as the mapped path's batches). It holds ``buf`` until it is done."""
        slots = np.full(len(idx), buf.slot, dtype=np.int64)
        loc, size, inline = buf.loc[idx], buf.size[idx], None
        if carried is not None:
            c_pos, inline, c_loc, c_size = carried
            positions = np.concatenate([c_pos, positions])
            slots = np.concatenate([np.full(len(c_pos), INLINE, dtype=np.int64), slots])
            loc, size = np.concatenate([c_loc, loc]), np.concatenate([c_size, size])
        if self.shuffle:
            order = np.argsort(self.file_rank[positions], kind="stable")
            positions, slots, loc, size = positions[order], slots[order], loc[order], size[order]
        buf.pool.issue(buf.slot)
        return BufferedBatch(positions, epoch, slots, loc, size, inline)

    @staticmethod
    def _carry(buf, positions, idx, carried=None):
        """Request items ``idx`` of ``buf`` copied out, after ``carried``: a batch begun in one buffer and
        finished in a later one carries these records itself, so it never holds two buffers."""
        data, at = copy_records(buf.pool.data[buf.slot], buf.loc[idx], buf.size[idx])
        size = buf.size[idx]
        if carried is None:
            return positions, data, at, size
        c_pos, c_data, c_at, c_size = carried
        return (
            np.concatenate([c_pos, positions]),
            np.concatenate([c_data, data]),
            np.concatenate([c_at, at + len(c_data)]),
            np.concatenate([c_size, size]),
        )

    def _records(self, buffers: list, loads, epoch: int):
        bs = self.batch_size
        carried = None  # a batch begun in earlier buffers: (positions, records, loc, size)
        for positions, buf in zip(buffers, loads):
            i = 0
            if carried is not None:
                i = min(bs - len(carried[0]), len(positions))
                if len(carried[0]) + i == bs:
                    idx = np.arange(i)
                    yield self._batch(epoch, buf, positions[idx], idx, carried)
                    carried = None
                else:  # this whole buffer is too short to finish it (tiny buffers)
                    carried = self._carry(buf, positions, np.arange(len(positions)), carried)
            while i + bs <= len(positions):
                idx = np.arange(i, i + bs)
                yield self._batch(epoch, buf, positions[idx], idx)
                i += bs
            if carried is None and i < len(positions):
                idx = np.arange(i, len(positions))
                carried = self._carry(buf, positions[idx], idx)
            buf.release()
        if carried is not None and not self.drop_last:
            c_pos, data, at, size = carried
            slots = np.full(len(c_pos), INLINE, dtype=np.int64)
            if self.shuffle:
                order = np.argsort(self.file_rank[c_pos], kind="stable")
                c_pos, at, size = c_pos[order], at[order], size[order]
            yield BufferedBatch(c_pos, epoch, slots, at, size, data)
