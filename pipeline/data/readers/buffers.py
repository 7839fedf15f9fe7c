"""Sequential buffers of shard files: ``BufferStream`` (``shards`` and ``encoded``), fixed- or variable-size
records.

    from pipeline.data.readers.buffers import BufferStream
    stream = BufferStream(files, mode="memory")
    for buf in stream.load([(file_ids, records), ...]):   # one Buffer per request, read one ahead
        stream.pool.issue(buf.slot)                       # a batch will read from it ...
        stream.pool.rows_into(buf.slot, buf.loc[idx], out)  # ... (anywhere: a worker too) ...
        stream.pool.done(buf.slot, reader)                # ... and has
        buf.release()                                     # the consumer cut its last batch from it

A request -- the records of a few shards that a shuffle will mix -- is held one of two ways. ``memory``:
read by a background thread with large ``pread`` calls into anonymous memory (counted as the job's memory)
while the consumer works on the buffer before, at most ``depth`` (2) held, every range dropped from the page
cache (``POSIX_FADV_DONTNEED``, whole folios: reads end on ``PIECE`` boundaries, range edges rounded out to
``FOLIO``) as soon as it is copied, so a job streaming more data than memory does not evict everything else
on the machine. A file's wanted records are read as one range when they are at least half of their span
(the kernel's sequential readahead keeps the disk busy), else as their own ranges (coalesced across gaps
under ``SPARSE_GAP``) with readahead off and ``WILLNEED`` a window ahead, so a sparse read (a validation
split) neither reads its gaps nor waits on one read at a time. ``mapped``: read through memory maps of the
files, the next buffer asked of the kernel ahead (``WILLNEED``); nothing copied or dropped, so data that
fits in memory stays cached for the next epoch and a warm pass costs what the plain memory map did.

**Who may still read a buffer** (``BufferPool``). A ``memory`` buffer is reused for a later request only
once nothing reads it any more: the consumer's own hold (released when it has cut its last batch from the
buffer) and every batch that reads from it (``issue`` when the batch is handed out, ``done`` when its records
have been copied out, by whichever process read them). The counts are per buffer and per reader (the
main process is reader 0, DataLoader worker w is reader w + 1), each written by one process only, so they
need no lock; in ``BufferPool.shared`` they live in shared memory with the buffers themselves, allocated
before the workers start, and the workers copy records straight out of the buffers the main process read.
The reader thread waits for a free buffer; it never waits on the consumer's thread, so a consumer that
hands batches to workers cannot deadlock it.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading

import numpy as np

from pipeline.data.integrity import IntegrityError
from pipeline.data.readers.files import (
    LOCAL,
    MIB,
    RWF_NOWAIT,
    ExportFiles,
    RecordFile,
    cached_byte,
    pread_exact,
    runs_of,
)

PIECE = 8 * MIB  # bytes per pread of a sequential range (pieces end on multiples of it)
FOLIO = 2 * MIB  # the largest page-cache folio on x86-64 (PMD size)
SPARSE_GAP = 16 * 1024  # a sparse read coalesces records whose gap is at most this
DENSE = 0.5  # a file's wanted bytes over its wanted span from which the span is read whole
WINDOW = 32 * MIB  # WILLNEED issued this far ahead of a sparse read


class BufferPool:
    """``len(data)`` buffers, and the count of batches issued from and done with each (module docstring).

    ``private(depth)``: anonymous memory of this process, each buffer grown to the largest request;
    ``shared(depth, nbytes, readers)`` (pipeline/data/storage/sharded.py allocates it): buffers and counts
    in memory that forked or spawned DataLoader workers share."""

    def __init__(
        self, data: list[np.ndarray], issued: np.ndarray, done: np.ndarray, fixed: bool, owners=None
    ) -> None:
        self.data, self.issued, self.done_count, self.fixed = list(data), issued, done, fixed
        self.owners = owners  # shared: what owns the memory (torch shared tensors), pickled instead of it
        self.cond = threading.Condition()

    @classmethod
    def private(cls, depth: int) -> BufferPool:
        data = [np.empty(0, dtype=np.uint8) for _ in range(depth)]
        return cls(data, np.zeros(depth, np.int64), np.zeros((1, depth), np.int64), fixed=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["cond"] = None
        if self.owners is not None:  # a spawned worker maps the shared memory itself, not a copy
            state.update(data=None, issued=None, done_count=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.cond = threading.Condition()
        if self.owners is not None:
            data, issued, done = self.owners
            self.data = [d.numpy() for d in data]
            self.issued, self.done_count = issued.numpy(), done.numpy()

    def __len__(self) -> int:
        return len(self.data)

    @property
    def readers(self) -> int:
        return self.done_count.shape[0]

    def reset(self) -> None:
        """Forget every count: called when a pass starts, when no batch of an earlier pass is still being
        read (a DataLoader's workers of the last pass have ended, or -- persistent -- drained)."""
        self.issued[:] = 0
        self.done_count[:] = 0

    def free(self, slot: int) -> bool:
        return int(self.issued[slot]) == int(self.done_count[:, slot].sum())

    def issue(self, slot: int, n: int = 1) -> None:
        """``n`` more readers of buffer ``slot`` (the consumer's hold, or a batch). Main process only."""
        self.issued[slot] += n

    def done(self, slot: int, reader: int = 0) -> None:
        """Reader ``reader`` (0: the main process, w + 1: worker w) has finished with buffer ``slot``."""
        self.done_count[reader, slot] += 1
        if reader == 0:
            with self.cond:
                self.cond.notify_all()

    def acquire(self, nbytes: int, stop: threading.Event) -> int | None:
        """A free buffer of at least ``nbytes`` (waiting for one); None once ``stop`` is set. Workers'
        ``done`` cannot notify this process's condition, so the wait also looks every few milliseconds."""
        with self.cond:
            while not stop.is_set():
                for slot in range(len(self.data)):
                    if self.free(slot):
                        if len(self.data[slot]) < nbytes:
                            if self.fixed:
                                raise ValueError(
                                    f"a buffer request of {nbytes} bytes exceeds the shared buffers' "
                                    f"{len(self.data[slot])}"
                                )
                            self.data[slot] = np.empty(max(-(-nbytes // PIECE) * PIECE, PIECE), np.uint8)
                        return slot
                self.cond.wait(0.002)
        return None


def rows_at(data: np.ndarray, loc: np.ndarray, record_bytes: int, out: np.ndarray) -> None:
    """Fixed-size records at byte offsets ``loc`` of ``data`` (a buffer) into ``out`` (k records; any shape
    of k x record_bytes bytes)."""
    table = data[: len(data) // record_bytes * record_bytes].reshape(-1, record_bytes)
    np.take(table, np.asarray(loc, dtype=np.int64) // record_bytes, axis=0, out=out.reshape(len(loc), -1))


def copy_records(data: np.ndarray, loc: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Records at ``loc``/``size`` of ``data`` copied into one new array, and their offsets in it."""
    at = np.concatenate(([0], np.cumsum(size)[:-1])).astype(np.int64) if len(size) else np.empty(0, np.int64)
    out = np.empty(int(np.sum(size)), dtype=np.uint8)
    for a, n, b in zip(loc.tolist(), size.tolist(), at.tolist()):
        out[b : b + n] = data[a : a + n]
    return out, at


class Buffer:
    """The records of one request, read into buffer ``slot`` of ``pool``: request item i at byte
    ``loc[i]``, ``size[i]`` bytes long. ``release`` ends the consumer's hold (batches issued from it keep it
    until they are done)."""

    def __init__(
        self, pool: BufferPool, slot: int, loc: np.ndarray, size: np.ndarray, record_bytes: int
    ) -> None:
        self.pool, self.slot, self.loc, self.size, self.record_bytes = pool, slot, loc, size, record_bytes
        self.released = False

    def __len__(self) -> int:
        return len(self.loc)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool.done(self.slot, 0)


class MappedBuffer:
    """The records of one request, read through the files' memory maps (the page cache: nothing held)."""

    def __init__(self, file_ids: np.ndarray, records: np.ndarray) -> None:
        self.file_ids, self.records = file_ids, records

    def __len__(self) -> int:
        return len(self.records)

    def release(self) -> None:
        pass


_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class BufferStream:
    """Reads requests of records one ahead of the consumer, ``memory`` or ``mapped`` (module docstring)."""

    MODES = ("memory", "mapped")

    def __init__(
        self, files: list[RecordFile], mode: str = "memory", depth: int = 2, source: ExportFiles = LOCAL
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"BufferStream mode {mode!r}; valid: {self.MODES}")
        if source.remote and mode != "memory":
            raise ValueError("files in object storage are read into memory buffers (mode 'memory')")
        self.files, self.mode, self.depth = list(files), mode, max(1, int(depth))
        self.source = source  # where the files are read from (the local disk, or a cache of a bucket)
        self.pool = BufferPool.private(self.depth)  # replaced by a shared pool when workers read it
        sizes = {f.record_bytes for f in self.files}
        fixed = all(f.offsets is None for f in self.files) and len(sizes) == 1
        self.record_bytes = sizes.pop() if fixed else 0
        self._maps: dict[int, tuple] = {}
        self.opened_pid: int | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_maps={}, opened_pid=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _map(self, f: int) -> tuple:
        """(mmap, flat uint8 view of the whole file, fixed-size record table or None) of file ``f``."""
        if self.opened_pid == os.getpid():  # the common case, without the lock
            entry = self._maps.get(f)
            if entry is not None:
                return entry
        with self._lock:
            if self.opened_pid != os.getpid():
                self._maps, self.opened_pid = {}, os.getpid()
            entry = self._maps.get(f)
            if entry is None:
                rf = self.files[f]
                local = self.source.open(rf.path)  # the map stays readable after the source lets it go
                try:
                    fh = open(local, "rb")
                finally:
                    self.source.close(rf.path)
                with fh:
                    size = os.fstat(fh.fileno()).st_size
                    end = int(rf.spans(np.array([rf.count - 1]))[1][0]) if rf.count else rf.offset
                    if size < end:
                        raise IntegrityError(
                            f"{rf.path} holds {size} bytes, its {rf.count} records end at byte {end}: "
                            "truncated; delete the export to re-export"
                        )
                    mm = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) if size else None
                flat = np.frombuffer(mm, np.uint8) if mm is not None else np.empty(0, np.uint8)
                table = None
                if rf.offsets is None and rf.record_bytes:
                    table = flat[rf.offset : rf.offset + rf.count * rf.record_bytes].reshape(
                        -1, rf.record_bytes
                    )
                entry = self._maps[f] = (mm, flat, table)
            return entry

    def gather(self, file_ids: np.ndarray, records: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Fixed-size records straight from the files' memory maps into ``out`` (k records; any shape of
        k x record_bytes bytes; default a new ``(k, record_bytes)`` uint8 array), one read per run of equal
        file ids (few when they come in file order)."""
        if out is None:
            out = np.empty((len(records), self.record_bytes), dtype=np.uint8)
        rows = out.reshape(len(records), -1).view(np.uint8)
        for f, a, b in runs_of(file_ids):
            self._map(f)[2].take(records[a:b], axis=0, out=rows[a:b], mode="clip")
        return out

    def mapped_record(self, file_id: int, record: int) -> np.ndarray:
        """One variable-size record, a view of the file's memory map."""
        start, end = self.files[file_id].spans(np.array([record]))
        return self._map(file_id)[1][int(start[0]) : int(end[0])]

    def plan(self, file_ids, records) -> tuple[list, np.ndarray, np.ndarray, int]:
        """Byte ranges to read for one request: ([(file, start, end, dest, dense), ...], loc, size, total
        bytes), ``loc[i]``/``size[i]`` locating request item i in the buffer."""
        file_ids = np.asarray(file_ids, dtype=np.int64)
        records = np.asarray(records, dtype=np.int64)
        loc, size = np.empty(len(records), np.int64), np.empty(len(records), np.int64)
        ranges, dest = [], 0
        order = np.lexsort((records, file_ids))
        cuts = np.flatnonzero(np.diff(file_ids[order])) + 1
        for part in np.split(order, cuts) if len(order) else []:
            fid = int(file_ids[part[0]])
            f = self.files[fid]
            recs = records[part]
            if recs[0] < 0 or recs[-1] >= f.count:
                raise IndexError(f"records outside [0, {f.count}) asked of {f.path}")
            start, end = f.spans(recs)
            if int((end - start).sum()) >= DENSE * (int(end[-1]) - int(start[0])):
                first, last = np.array([0]), np.array([len(recs)])
            else:
                cut = np.flatnonzero(start[1:] - end[:-1] > SPARSE_GAP) + 1
                first, last = np.concatenate(([0], cut)), np.concatenate((cut, [len(recs)]))
            dense = len(first) == 1 and len(recs) > 1
            for a, b in zip(first.tolist(), last.tolist()):
                lo, hi = int(start[a]), int(end[b - 1])
                ranges.append((fid, lo, hi, dest, dense))
                loc[part[a:b]] = dest + (start[a:b] - lo)
                size[part[a:b]] = end[a:b] - start[a:b]
                dest += hi - lo
        return ranges, loc, size, dest

    def load(self, requests):
        """Buffers for ``requests`` (an iterable of ``(file_ids, records)``), in order, each read while the
        consumer works on the one before. A ``memory`` buffer stays valid until the consumer ``release``s it
        and every batch issued from it is ``done`` (module docstring); closing the generator stops the reader
        thread."""
        if self.mode == "mapped":
            return self._load_mapped(requests)
        return self._load_memory(requests)

    def _load_mapped(self, requests):
        """No thread: the kernel reads buffer k + 1 ahead (``WILLNEED``) while buffer k is used."""
        fds: dict[tuple[int, bool], int] = {}
        pairs = ((np.asarray(f, dtype=np.int64), np.asarray(r, dtype=np.int64)) for f, r in requests)
        try:
            nxt = next(pairs, None)
            if nxt is not None:
                self._advise(*nxt, fds)
            while nxt is not None:
                current, nxt = nxt, next(pairs, None)
                if nxt is not None:
                    self._advise(*nxt, fds)
                yield MappedBuffer(*current)
        finally:
            self._close(fds)

    def _load_memory(self, requests):
        pool, stop = self.pool, threading.Event()
        pool.reset()
        q: queue.Queue = queue.Queue()

        def produce() -> None:
            fds: dict[tuple[int, bool], int] = {}
            pending = iter(requests)
            nxt = next(pending, None)
            try:
                while nxt is not None:
                    file_ids, records = (np.asarray(a, dtype=np.int64) for a in nxt)
                    nxt = next(pending, None)
                    if nxt is not None:  # the next buffer's files start coming now (object storage)
                        self.source.prefetch(self.files[f].path for f in np.unique(np.asarray(nxt[0])))
                    ranges, loc, size, total = self.plan(file_ids, records)
                    slot = pool.acquire(total, stop)  # a buffer nothing reads any more
                    if slot is None:
                        return
                    pool.issue(slot)  # the consumer's hold, until it has cut its last batch
                    try:
                        self._read(ranges, pool.data[slot], fds, stop)
                    finally:
                        self._close(fds)  # its files are in the buffer now: the source may let them go
                    q.put(Buffer(pool, slot, loc, size, self.record_bytes))
                q.put(_DONE)
            except BaseException as exc:  # handed to the consumer, raised there
                q.put(_Failure(exc))
            finally:
                self._close(fds)

        thread = threading.Thread(target=produce, name="buffer-read", daemon=True)
        thread.start()
        handed: list[Buffer] = []
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                handed.append(item)
                yield item
        finally:
            stop.set()
            thread.join()
            while not q.empty():  # read but never handed out: nothing will release them otherwise
                item = q.get()
                if isinstance(item, Buffer):
                    handed.append(item)
            for buf in handed:  # the consumer stopped early (an error, a break): its holds end here
                buf.release()

    def _advise(self, file_ids: np.ndarray, records: np.ndarray, fds: dict) -> None:
        """Ask the kernel to read the span of each file a mapped buffer uses (``WILLNEED`` returns at once; a
        fault on a page still in flight waits for it) -- unless a probe of a few of its pages finds them all
        cached already (walking a cached span costs ~0.4 ms per 64 MiB)."""
        for f in np.flatnonzero(np.bincount(file_ids, minlength=len(self.files))).tolist():
            recs = records[file_ids == f]
            start, end = self.files[f].spans(np.array([recs.min(), recs.max()]))
            lo, n = int(start[0]), int(end[1] - start[0])
            fd = self._fd(fds, f, True)
            probes = [lo + k * (n - 1) // 4 for k in range(5)]
            if RWF_NOWAIT is not None and all(cached_byte(fd, off) for off in probes):
                continue
            os.posix_fadvise(fd, lo, n, os.POSIX_FADV_WILLNEED)

    def _fd(self, fds: dict, f: int, dense: bool) -> int:
        """One descriptor per file and access kind: kernel readahead for dense ranges, none for sparse."""
        fd = fds.get((f, dense))
        if fd is None:
            local = self.source.open(self.files[f].path)  # held (once per file) until ``_close``
            fd = fds[(f, dense)] = os.open(local, os.O_RDONLY)
            if not dense:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    def _close(self, fds: dict) -> None:
        """Close every descriptor; each file's source hold ends (once per file)."""
        files = {f for f, _ in fds}
        for fd in fds.values():
            os.close(fd)
        fds.clear()
        for f in files:
            self.source.close(self.files[f].path)

    def _read(self, ranges: list, data: np.ndarray, fds: dict, stop: threading.Event) -> None:
        """Copy ``ranges`` into ``data``: large reads, sparse ones asked for a window ahead, pages dropped
        behind. The kernel drops only whole page-cache folios inside a range (up to ``FOLIO`` on x86-64,
        naturally aligned), so pieces end on ``PIECE`` boundaries and each range's edges are dropped
        rounded out, or the folios straddling them would stay cached."""
        view = memoryview(data).cast("B")
        pieces = []
        for f, lo, hi, dest, dense in ranges:
            cuts = [lo, *range((lo // PIECE + 1) * PIECE, hi, PIECE), hi]
            for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
                edge = (lo, hi) if k == len(cuts) - 2 else None  # the range's last piece
                pieces.append((f, a, b, dest + a - lo, dense, edge))
        ahead, ahead_bytes, done_bytes = 0, 0, 0
        for f, lo, hi, dest, dense, edge in pieces:
            if stop.is_set():
                return
            while ahead < len(pieces) and ahead_bytes - done_bytes < WINDOW:
                af, alo, ahi, _, adense, _ = pieces[ahead]
                if not adense:  # dense ranges get the kernel's own readahead
                    os.posix_fadvise(self._fd(fds, af, False), alo, ahi - alo, os.POSIX_FADV_WILLNEED)
                ahead_bytes += ahi - alo
                ahead += 1
            fd = self._fd(fds, f, dense)
            pread_exact(fd, view[dest : dest + hi - lo], lo, self.files[f].path)
            os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)  # drop behind: the copy is ours now
            if edge is not None:  # the range's edges, rounded out to whole folios (pages for sparse reads)
                unit = FOLIO if dense else mmap.PAGESIZE
                a, b = edge[0] - edge[0] % unit, -(-edge[1] // unit) * unit
                os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_DONTNEED)
            done_bytes += hi - lo
