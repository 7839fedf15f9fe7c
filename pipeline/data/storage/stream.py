"""Reads designed for a disk when the data may be larger than the page cache: random rows, sequential buffers.

    from pipeline.data.storage.stream import RowReader, RecordFile, BufferStream, npy_layout
    offset, shape, dtype = npy_layout(path, count)          # checked against the file's size
    rows = RowReader(path, offset, row_bytes, num_rows).read([9, 2, 5])   # (3, row_bytes) uint8

    files = [RecordFile(path, offset, count, record_bytes=rb), ...]   # or offsets=... (variable size)
    for buf in BufferStream(files, mode="memory").load([(file_ids, records), ...]):  # one per buffer
        x = buf.rows(idx)                # fixed-size records idx of the request: (k, rb) uint8 copies
        blob, offsets = buf.blobs(idx)   # variable-size records: bytes + k + 1 offsets
        b = buf.batch(positions, idx)    # either kind as a RecordBatch (what a batch sampler hands on)

Figures and conditions: docs/storage-formats.md. Why the readers look like this:

**Random rows** (``RowReader``: ``memmap``, and the direct reads of ``shards``). A shuffled pass through a
default memory map makes the kernel read ahead on every page fault (8 MiB on this machine) and, once the
file is larger than the cache, evict those pages before use: 484x the data read. ``RowReader`` turns
readahead off (``POSIX_FADV_RANDOM`` on its descriptor, ``MADV_RANDOM`` on its map) and reads a batch's
rows (sorted, adjacent ones in one read) in two steps:

1. ``os.preadv(..., RWF_NOWAIT)`` per run of rows: served from the page cache only, never waiting for
   the disk (on this kernel a miss also starts the read of that range);
2. the misses get ``POSIX_FADV_WILLNEED`` (starts their reads on any kernel), then plain ``pread`` from
   ``threads`` threads, so a batch's misses wait on the disk side by side, not one after the other.

``advise(rows)`` issues that ``WILLNEED`` earlier, for a batch still to come (memmap's batch sampler asks two
batches ahead), unless ``ADVISE_PROBES`` of its rows are all cached already.

Warm, step 1 costs a system call per row, about twice a fancy index on a memory map. So after
``MAPPED_AFTER`` consecutive batches served wholly from the cache the reader reads through its own map,
one fancy index per batch (the speed of the plain memory map); every ``PROBE_EVERY``-th batch first reads
its first row with ``RWF_NOWAIT``, and a miss (the cache lost the file) goes back to steps 1-2.

**Sequential buffers** (``BufferStream``: ``shards``; built for any shard files of fixed- or
variable-size records). A request -- the records of a few shards that a shuffle will mix -- is held one of
two ways. ``memory``: read by a background thread with large ``pread`` calls into anonymous memory
(counted as the job's memory) while the consumer works on the buffer before, at most ``depth`` (2) held,
every range dropped from the page cache (``POSIX_FADV_DONTNEED``, whole folios: reads end on ``PIECE``
boundaries, range edges rounded out to ``FOLIO``) as soon as it is copied, so a job streaming more data
than memory does not evict everything else on the machine. A file's wanted records
are read as one range when they are at least half of their span (the kernel's sequential readahead keeps
the disk busy), else as their own ranges (coalesced across gaps under ``SPARSE_GAP``) with readahead off
and ``WILLNEED`` a window ahead, so a sparse read (a validation split) neither reads its gaps nor waits on
one read at a time. ``mapped``: read through memory maps of the files, the next buffer asked of the kernel
ahead (``WILLNEED``); nothing copied or dropped, so data that fits in memory stays cached for the next
epoch and a warm pass costs what the plain memory map did.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.integrity import IntegrityError

MIB = 2**20
MAPPED_AFTER = 8  # consecutive fully cached batches before RowReader reads through its map
ADVISE_PROBES = 4  # rows of an advised batch probed to tell whether the file is warm
PROBE_EVERY = 8  # reading through its map, RowReader checks every this many batches that the cache holds rows
PIECE = 8 * MIB  # bytes per pread of a sequential range (pieces end on multiples of it)
FOLIO = 2 * MIB  # the largest page-cache folio on x86-64 (PMD size)
SPARSE_GAP = 16 * 1024  # a sparse read coalesces records whose gap is at most this
DENSE = 0.5  # a file's wanted bytes over its wanted span from which the span is read whole
WINDOW = 32 * MIB  # WILLNEED issued this far ahead of a sparse read
RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)  # Linux >= 4.14, Python >= 3.7


# ---- files ----


def npy_layout(path: Path, count: int | None = None) -> tuple[int, tuple, np.dtype]:
    """(data offset, shape, dtype) of a C-order ``.npy`` file, from its header and numpy's public format
    functions (the header alone, read with readahead off: opening a cold export reads none of its data).
    Raises IntegrityError naming the file when the header is bad, the file is shorter or longer than the
    header says (truncated or corrupted), or it does not hold ``count`` rows."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            size = os.fstat(fd).st_size
            head = os.pread(fd, 12, 0)  # magic (6), version (2), header length (2 or 4)
            if len(head) < 10 or head[:6] != b"\x93NUMPY":
                raise ValueError("not a .npy file (no magic string)")
            width = 2 if head[6] == 1 else 4
            header_len = int.from_bytes(head[8 : 8 + width], "little")
            offset = 8 + width + header_len
            fh = io.BytesIO(os.pread(fd, offset, 0))
        finally:
            os.close(fd)
        version = np.lib.format.read_magic(fh)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = read_header(fh)
    except (OSError, ValueError, SyntaxError) as err:
        raise IntegrityError(
            f"{path} is not a readable .npy file ({err}); delete the export to re-export"
        ) from err
    want = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if fortran or dtype.hasobject or size != want or (count is not None and (not shape or shape[0] != count)):
        raise IntegrityError(
            f"{path} is damaged: {size} bytes, its header says {shape} {dtype} "
            f"({want} bytes{', Fortran order' if fortran else ''})"
            + (f", the index says {count} records" if count is not None else "")
            + "; delete the export to re-export"
        )
    return offset, tuple(shape), dtype


def _cached_byte(fd: int, offset: int) -> bool:
    """Whether the byte at ``offset`` is in the page cache (a one-byte ``RWF_NOWAIT`` read)."""
    try:
        return os.preadv(fd, [bytearray(1)], offset, RWF_NOWAIT) == 1
    except OSError:  # BlockingIOError: not cached; others: no RWF_NOWAIT here
        return False


def _pread_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill ``view`` from ``offset``; a file that ends first is named in an IntegrityError."""
    done, want = 0, len(view)
    while done < want:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise IntegrityError(
                f"{path} ends at byte {offset + done}, before the {want} bytes wanted from {offset}: "
                "the file was truncated after export; delete the export to re-export"
            )
        done += n


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def io_pool(threads: int) -> ThreadPoolExecutor:
    """One thread pool per process and size (a forked DataLoader worker makes its own)."""
    key = (os.getpid(), int(threads))
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = ThreadPoolExecutor(int(threads), thread_name_prefix="row-read")
    return pool


# ---- random rows ----


def runs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) indices of the runs of consecutive values in sorted ``rows``."""
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    return np.concatenate(([0], cut)), np.concatenate((cut, [len(rows)]))


class RowReader:
    """Fixed-size rows of one file, read in any order, cold or warm (see the module docstring).

    Opened lazily in the process that reads: a forked DataLoader worker opens its own descriptor, map and
    thread pool; pickling sends only the path and sizes.
    """

    def __init__(self, path: Path, offset: int, row_bytes: int, num_rows: int, threads: int = 16) -> None:
        self.path, self.offset = Path(path), int(offset)
        self.row_bytes, self.num_rows, self.threads = int(row_bytes), int(num_rows), max(1, int(threads))
        self.opened_pid: int | None = None
        self._fd = self._map = self._rows = None
        self.mapped, self.clean = False, 0  # reading through the map; fully cached batches in a row
        self.batches = 0
        self.nowait = RWF_NOWAIT is not None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(opened_pid=None, _fd=None, _map=None, _rows=None, mapped=False, clean=0, batches=0)
        return state

    def _open(self) -> None:
        if self.opened_pid == os.getpid():
            return
        fd = os.open(self.path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        if size < self.offset + self.num_rows * self.row_bytes:
            os.close(fd)
            raise IntegrityError(
                f"{self.path} holds {size} bytes, fewer than the {self.num_rows} rows of {self.row_bytes} "
                f"bytes from byte {self.offset} it should: truncated; delete the export to re-export"
            )
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead on this descriptor
        self._fd, self._map, self._rows = fd, None, None
        if self.num_rows:
            self._map = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            self._map.madvise(mmap.MADV_RANDOM)  # no readahead on page faults either
            flat = np.frombuffer(self._map, np.uint8, self.num_rows * self.row_bytes, self.offset)
            self._rows = flat.reshape(self.num_rows, self.row_bytes)
        self.opened_pid, self.mapped, self.clean = os.getpid(), False, 0

    def read(self, rows, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed) as a ``(len(rows), row_bytes)`` uint8 array."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self.mapped and self.opened_pid == os.getpid():
            self.batches += 1
            if self.batches % PROBE_EVERY:  # warm: one fancy index on the map (it checks the bounds)
                if out is None:
                    return self._rows.take(rows, axis=0)
                return self._rows.take(rows, axis=0, out=out)
        if out is None:
            out = np.empty((len(rows), self.row_bytes), dtype=np.uint8)
        if len(rows) == 0:
            return out
        ascending = len(rows) == 1 or bool((rows[1:] >= rows[:-1]).all())
        low, high = (rows[0], rows[-1]) if ascending else (rows.min(), rows.max())
        if low < 0 or high >= self.num_rows:
            raise IndexError(f"rows outside [0, {self.num_rows}) asked of {self.path}")
        if ascending:
            self._read_sorted(rows, out)
            return out
        order = np.argsort(rows, kind="stable")
        tmp = np.empty_like(out)
        self._read_sorted(rows[order], tmp)
        out[order] = tmp
        return out

    def advise(self, rows) -> None:
        """Start reading ``rows`` (sorted) in the background (``POSIX_FADV_WILLNEED`` per run of rows), so
        that their batch finds them cached or in flight -- unless the file looks warm: read through the map,
        or ``ADVISE_PROBES`` of the rows all cached (a cache holding a fraction f of the file passes that
        with probability f^4). Rows asked for this way make their batch look cached, so it does not count
        towards reading through the map."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows) or self.mapped:
            return
        self._open()
        rb = self.row_bytes
        probes = rows[np.linspace(0, len(rows) - 1, min(ADVISE_PROBES, len(rows))).astype(np.int64)]
        if all(_cached_byte(self._fd, self.offset + int(r) * rb) for r in probes.tolist()):
            return
        starts, ends = runs(rows)
        for i, j in zip(starts.tolist(), ends.tolist()):
            os.posix_fadvise(self._fd, self.offset + int(rows[i]) * rb, (j - i) * rb, os.POSIX_FADV_WILLNEED)
        self.clean = 0

    def _cached(self, view: memoryview, rows: np.ndarray, i: int, j: int):
        """Read rows[i:j] (consecutive) from the page cache only; None when all came, else the missing part
        as (start, end, file offset)."""
        rb = self.row_bytes
        lo, hi, off = i * rb, j * rb, self.offset + int(rows[i]) * rb
        got = 0
        if self.nowait:
            try:
                got = os.preadv(self._fd, [view[lo:hi]], off, RWF_NOWAIT)
            except BlockingIOError:
                got = 0
            except OSError as err:  # a file system without RWF_NOWAIT
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.nowait = False
        return None if got >= hi - lo else (lo + got, hi, off + got)

    def _read_sorted(self, rows: np.ndarray, out: np.ndarray) -> None:
        self._open()
        view = memoryview(out).cast("B")
        if self.mapped:  # probe the first row: cached, the rest through the map
            if self._cached(view, rows, 0, 1) is None:
                if len(rows) > 1:
                    np.take(self._rows, rows[1:], axis=0, out=out[1:], mode="clip")
                return
            self.mapped, self.clean = False, 0
        starts, ends = runs(rows)
        misses = []
        for i, j in zip(starts.tolist(), ends.tolist()):
            miss = self._cached(view, rows, i, j)
            if miss is not None:
                misses.append(miss)
        if not misses:
            self.clean += 1
            self.mapped = self.nowait and self.clean >= MAPPED_AFTER
            self.batches = 0
            return
        self.clean = 0
        self._read_misses(view, misses)

    def _read_misses(self, view: memoryview, misses: list) -> None:
        for lo, hi, off in misses:  # start every read now; the pool then waits for them side by side
            os.posix_fadvise(self._fd, off, hi - lo, os.POSIX_FADV_WILLNEED)
        k = min(self.threads, len(misses))
        if k == 1:
            self._read_ranges(view, misses)
            return
        pool = io_pool(self.threads)
        for f in [pool.submit(self._read_ranges, view, misses[t::k]) for t in range(k)]:
            f.result()

    def _read_ranges(self, view: memoryview, ranges: list) -> None:
        for lo, hi, off in ranges:
            _pread_exact(self._fd, view[lo:hi], off, self.path)


# ---- sequential buffers ----


@dataclass(frozen=True)
class RecordFile:
    """A file of ``count`` records from byte ``offset``: each ``record_bytes`` long, or variable, record i
    spanning ``offsets[i]:offsets[i + 1]`` (``count + 1`` byte offsets from ``offset``)."""

    path: Path
    offset: int
    count: int
    record_bytes: int = 0
    offsets: np.ndarray | None = None

    def spans(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Absolute (start, end) byte offsets of ``records``."""
        if self.offsets is None:
            start = self.offset + records * self.record_bytes
            return start, start + self.record_bytes
        return self.offset + self.offsets[records], self.offset + self.offsets[records + 1]


@dataclass
class RecordBatch:
    """What a sampler that reads hands ``Dataset.__getitems__`` for one batch: the batch's positions and its
    raw records -- ``(k, record_bytes)`` uint8 for fixed-size records, else concatenated bytes with
    ``offsets`` (k + 1). Iterating it gives the positions, so per-item fetching still works."""

    positions: np.ndarray
    records: np.ndarray
    offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self):
        return iter(self.positions.tolist())

    def take(self, idx) -> RecordBatch:
        """Items ``idx`` of this batch (a subset or a new order), records and all."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.offsets is None:
            return RecordBatch(self.positions[idx], self.records[idx])
        o = self.offsets
        records, offsets = _concat([(self.records, o[i], o[i + 1] - o[i]) for i in idx.tolist()])
        return RecordBatch(self.positions[idx], records, offsets)

    def join(self, other: RecordBatch) -> RecordBatch:
        """This batch followed by ``other`` (a batch that straddles two buffers)."""
        positions = np.concatenate([self.positions, other.positions])
        records = np.concatenate([self.records, other.records])
        if self.offsets is None:
            return RecordBatch(positions, records)
        offsets = np.concatenate([self.offsets, self.offsets[-1] + other.offsets[1:]])
        return RecordBatch(positions, records, offsets)


class Buffer:
    """The records of one request, copied into memory. ``rows``/``blobs`` take copies; ``release`` hands the
    memory back to the stream (use nothing of the buffer after it)."""

    def __init__(
        self, data: np.ndarray, loc: np.ndarray, size: np.ndarray, record_bytes: int, release
    ) -> None:
        self.data, self.loc, self.size, self.record_bytes = data, loc, size, record_bytes
        self._release = release

    def __len__(self) -> int:
        return len(self.loc)

    def rows(self, idx) -> np.ndarray:
        """Fixed-size records ``idx`` (indices into the request) as a ``(k, record_bytes)`` uint8 copy."""
        rb = self.record_bytes
        table = self.data[: len(self.data) // rb * rb].reshape(-1, rb)
        return table[self.loc[np.asarray(idx, dtype=np.int64)] // rb]

    def blobs(self, idx) -> tuple[np.ndarray, np.ndarray]:
        """Records ``idx`` concatenated (uint8) and their ``k + 1`` offsets into it."""
        idx = np.asarray(idx, dtype=np.int64)
        return _concat([(self.data, a, n) for a, n in zip(self.loc[idx].tolist(), self.size[idx].tolist())])

    def batch(self, positions: np.ndarray, idx) -> RecordBatch:
        """A ``RecordBatch`` of ``positions`` carrying records ``idx`` of this buffer (rows or blobs)."""
        if self.record_bytes:
            return RecordBatch(positions, self.rows(idx))
        return RecordBatch(positions, *self.blobs(idx))

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release(self.data)
        self.data = None


class MappedBuffer(Buffer):
    """The records of one request, read through the files' memory maps (the page cache, no copy held);
    ``batch`` and ``release`` as ``Buffer``'s."""

    def __init__(self, stream: BufferStream, file_ids: np.ndarray, records: np.ndarray, release) -> None:
        self.stream, self.file_ids, self.records = stream, file_ids, records
        self.record_bytes = stream.record_bytes
        self.data = None  # nothing held
        self._release = release

    def __len__(self) -> int:
        return len(self.records)

    def rows(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        return self.stream.gather(self.file_ids[idx], self.records[idx])

    def blobs(self, idx) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(idx, dtype=np.int64)
        return self.stream.gather_blobs(self.file_ids[idx], self.records[idx])


def runs_of(file_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """(file, start, end) of each run of equal values in ``file_ids``."""
    if not len(file_ids):
        return []
    bounds = [0, *(np.flatnonzero(file_ids[1:] != file_ids[:-1]) + 1).tolist(), len(file_ids)]
    return [(int(file_ids[a]), a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _concat(parts: list) -> tuple[np.ndarray, np.ndarray]:
    """(array, start, length) pieces concatenated, with their ``len + 1`` offsets."""
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([n for _, _, n in parts], out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=np.uint8)
    for k, (data, a, n) in enumerate(parts):
        out[offsets[k] : offsets[k] + n] = data[a : a + n]
    return out, offsets


_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class BufferStream:
    """Reads requests of records one ahead of the consumer, ``memory`` or ``mapped`` (module docstring)."""

    MODES = ("memory", "mapped")

    def __init__(self, files: list[RecordFile], mode: str = "memory", depth: int = 2) -> None:
        if mode not in self.MODES:
            raise ValueError(f"BufferStream mode {mode!r}; valid: {self.MODES}")
        self.files, self.mode, self.depth = list(files), mode, max(1, int(depth))
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
                with open(rf.path, "rb") as fh:
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

    def gather(self, file_ids: np.ndarray, records: np.ndarray) -> np.ndarray:
        """Fixed-size records straight from the files' memory maps, ``(k, record_bytes)`` uint8, one read
        per run of equal file ids (few when they come in file order)."""
        out = np.empty((len(records), self.record_bytes), dtype=np.uint8)
        for f, a, b in runs_of(file_ids):
            self._map(f)[2].take(records[a:b], axis=0, out=out[a:b], mode="clip")
        return out

    def gather_blobs(self, file_ids: np.ndarray, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Variable-size records straight from the maps: concatenated bytes and their offsets."""
        parts = []
        for f, a, b in runs_of(file_ids):
            start, end = self.files[f].spans(records[a:b])
            flat = self._map(f)[1]
            parts += [(flat, lo, hi - lo) for lo, hi in zip(start.tolist(), end.tolist())]
        return _concat(parts)

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
        consumer holds the one before. A buffer is valid until the next one is asked for (or its
        ``release``); closing the generator stops the reader thread."""
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
                yield MappedBuffer(self, *current, lambda data: None)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _load_memory(self, requests):
        slots = threading.Semaphore(self.depth)
        free: list[np.ndarray] = []
        lock = threading.Lock()
        stop = threading.Event()
        q: queue.Queue = queue.Queue()

        def give_back(data) -> None:
            if data is not None:
                with lock:
                    free.append(data)
            slots.release()

        def produce() -> None:
            fds: dict[tuple[int, bool], int] = {}
            try:
                for file_ids, records in requests:
                    while not slots.acquire(timeout=0.1):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    file_ids = np.asarray(file_ids, dtype=np.int64)
                    records = np.asarray(records, dtype=np.int64)
                    ranges, loc, size, total = self.plan(file_ids, records)
                    with lock:  # reuse a released buffer's memory (its pages are mapped already)
                        data = free.pop() if free else None
                    if data is None or len(data) < total:  # too small: dropped, a larger one made
                        data = None
                        data = np.empty(max(-(-total // PIECE) * PIECE, PIECE), dtype=np.uint8)
                    self._read(ranges, data, fds, stop)
                    q.put(Buffer(data, loc, size, self.record_bytes, give_back))
                q.put(_DONE)
            except BaseException as exc:  # handed to the consumer, raised there
                q.put(_Failure(exc))
            finally:
                for fd in fds.values():
                    os.close(fd)

        thread = threading.Thread(target=produce, name="buffer-read", daemon=True)
        thread.start()
        held = None
        try:
            while True:
                if held is not None:  # asking for the next buffer releases the one before
                    held.release()
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                held = item
                yield item
        finally:
            stop.set()
            thread.join()

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
            if RWF_NOWAIT is not None and all(_cached_byte(fd, off) for off in probes):
                continue
            os.posix_fadvise(fd, lo, n, os.POSIX_FADV_WILLNEED)

    def _fd(self, fds: dict, f: int, dense: bool) -> int:
        """One descriptor per file and access kind: kernel readahead for dense ranges, none for sparse."""
        fd = fds.get((f, dense))
        if fd is None:
            fd = fds[(f, dense)] = os.open(self.files[f].path, os.O_RDONLY)
            if not dense:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

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
            _pread_exact(fd, view[dest : dest + hi - lo], lo, self.files[f].path)
            os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)  # drop behind: the copy is ours now
            if edge is not None:  # the range's edges, rounded out to whole folios (pages for sparse reads)
                unit = FOLIO if dense else mmap.PAGESIZE
                a, b = edge[0] - edge[0] % unit, -(-edge[1] // unit) * unit
                os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_DONTNEED)
            done_bytes += hi - lo
