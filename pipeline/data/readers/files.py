"""Files of records on disk: the ``.npy`` header, record spans, exact positional reads, shared helpers.

from pipeline.data.readers.files import npy_layout, RecordFile
offset, shape, dtype = npy_layout(path, count)     # checked against the file's size
f = RecordFile(path, offset, count, record_bytes=rb)   # or offsets=... (variable-size records)
start, end = f.spans(records)                      # absolute byte ranges of records
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.integrity import IntegrityError

MIB = 2**20
HEADER_BYTES = 4096  # a .npy header is at most this long here (padded to 64 bytes; our shapes are small)
RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)  # Linux >= 4.14, Python >= 3.7 (an os constant, not a hook)


def npy_layout(path: Path, count: int | None = None, files=None) -> tuple[int, tuple, np.dtype]:
    """(data offset, shape, dtype) of a C-order ``.npy`` file, from its header and numpy's public format
    functions (the header alone, read with readahead off: opening a cold export reads none of its data; for
    a file in object storage, ``files`` -- an ``ExportFiles`` -- reads the header with one ranged GET).
    Raises IntegrityError naming the file when the header is bad, the file is shorter or longer than the
    header says (truncated or corrupted), or it does not hold ``count`` rows."""
    path = Path(path)
    try:
        if files is not None and files.remote:
            size, head = files.size(path), files.head(path, HEADER_BYTES)
        else:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                size = os.fstat(fd).st_size
                head = os.pread(fd, HEADER_BYTES, 0)
            finally:
                os.close(fd)
        if len(head) < 10 or head[:6] != b"\x93NUMPY":  # magic (6), version (2), header length (2 or 4)
            raise ValueError("not a .npy file (no magic string)")
        width = 2 if head[6] == 1 else 4
        offset = 8 + width + int.from_bytes(head[8 : 8 + width], "little")
        if offset > len(head):
            raise ValueError(f"a header of {offset} bytes, longer than this reader takes ({len(head)})")
        fh = io.BytesIO(head[:offset])
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


class ExportFiles:
    """Where an export's data files are read from: the local disk (this class), or object storage
    (pipeline/data/remote/files.py: a shard is fetched into a bounded local cache while it is read).

    ``open(path)`` gives a local path to read ``path`` from, held until ``close(path)``: an open descriptor
    or map stays valid after ``close`` (the cache may then evict the file; its data stays readable through
    what was opened). ``prefetch(paths)`` starts bringing files that will be read soon. ``size`` and
    ``head`` read what a reader checks before reading: a file's length and its first bytes."""

    remote = False

    def open(self, path: Path) -> Path:
        return Path(path)

    def close(self, path: Path) -> None:
        pass

    def prefetch(self, paths) -> None:
        pass

    def size(self, path: Path) -> int:
        return os.stat(path).st_size

    def head(self, path: Path, n: int) -> bytes:
        with open(path, "rb") as fh:
            return fh.read(n)

    def stats(self):
        """Cumulative counters of what was fetched from a remote store (bytes, cache hits), subtractable;
        None for local files."""
        return None


LOCAL = ExportFiles()


def cached_byte(fd: int, offset: int) -> bool:
    """Whether the byte at ``offset`` is in the page cache (a one-byte ``RWF_NOWAIT`` read)."""
    try:
        return os.preadv(fd, [bytearray(1)], offset, RWF_NOWAIT) == 1
    except OSError:  # BlockingIOError: not cached; others: no RWF_NOWAIT here
        return False


def pread_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
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


def runs_of(file_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """(file, start, end) of each run of equal values in ``file_ids``."""
    if not len(file_ids):
        return []
    bounds = [0, *(np.flatnonzero(file_ids[1:] != file_ids[:-1]) + 1).tolist(), len(file_ids)]
    return [(int(file_ids[a]), a, b) for a, b in zip(bounds[:-1], bounds[1:])]
