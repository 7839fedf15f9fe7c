"""Random rows of one file, cold or warm: ``RowReader`` (``memmap``, and the direct reads of ``shards``).

    from pipeline.data.readers.rows import RowReader
    rows = RowReader(path, offset, row_bytes, num_rows).read([9, 2, 5])   # (3, row_bytes) uint8

A shuffled pass through a default memory map makes the kernel read ahead on every page fault and, once the
file is larger than the cache, evict those pages before use (docs/storage-formats.md has the figures).
``RowReader`` turns readahead off (``POSIX_FADV_RANDOM`` on its descriptor, ``MADV_RANDOM`` on its map) and
reads a batch's rows (sorted, adjacent ones in one read) in two steps:

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
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import numpy as np

from pipeline.data.integrity import IntegrityError
from pipeline.data.readers.files import RWF_NOWAIT, cached_byte, io_pool, pread_exact

MAPPED_AFTER = 8  # consecutive fully cached batches before RowReader reads through its map
ADVISE_PROBES = 4  # rows of an advised batch probed to tell whether the file is warm
PROBE_EVERY = 8  # reading through its map, RowReader checks every this many batches that the cache holds rows


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

    def open(self) -> None:
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
        self.open()
        rb = self.row_bytes
        probes = rows[np.linspace(0, len(rows) - 1, min(ADVISE_PROBES, len(rows))).astype(np.int64)]
        if all(cached_byte(self._fd, self.offset + int(r) * rb) for r in probes.tolist()):
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
        self.open()
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
            pread_exact(self._fd, view[lo:hi], off, self.path)
