"""The disk's sequential read bandwidth, measured cold on one file (e.g. of an export).

    from pipeline.system.disk import largest_file, sequential_read
    r = sequential_read(largest_file(export_root))   # r.mb_per_s, r.bytes, r.seconds, r.from_disk
    samples_per_s = r.mb_per_s * 1e6 / sample_bytes  # the ceiling of a sequential reader

The file's own pages are dropped first (``posix_fadvise(DONTNEED)``: only this file, the rest of the
machine's cache stays), then it is read front to back with large (8 MiB) reads into one reused buffer,
at most ``max_bytes``, and its pages are dropped again afterwards. ``from_disk`` is the share of those
bytes that the block device really served (pipeline.system.iocount): below ~0.9 the file was still
cached (mapped by a live process?) and the figure is not the disk's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.system.iocount import disk_read_bytes
from pipeline.system.page_cache import fadvise_dontneed, files_of

BLOCK = 8 << 20
MAX_BYTES = 1 << 30


@dataclass
class DiskRead:
    path: Path
    bytes: int
    seconds: float
    from_disk: float  # share of the bytes fetched from the block device (1.0 = all of them)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def largest_file(paths) -> Path:
    files = files_of(paths)
    if not files:
        raise FileNotFoundError(f"no file under {paths}")
    return max(files, key=lambda f: f.stat().st_size)


def sequential_read(path: Path, max_bytes: int = MAX_BYTES, block: int = BLOCK) -> DiskRead:
    path = Path(path)
    buf = bytearray(block)
    view = memoryview(buf)
    fadvise_dontneed(path)
    before = disk_read_bytes()
    total = 0
    with open(path, "rb", buffering=0) as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        t0 = time.perf_counter()
        while total < max_bytes:
            n = fh.readinto(view[: min(block, max_bytes - total)])
            if not n:
                break
            total += n
        seconds = time.perf_counter() - t0
    after = disk_read_bytes()
    fadvise_dontneed(path)
    share = (after - before) / total if total and before is not None else 0.0
    return DiskRead(path, total, seconds, min(share, 1.0))
