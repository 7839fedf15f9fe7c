"""Drop an export's pages from the page cache, so that the next read of it comes from the disk.

    from pipeline.system.page_cache import drop, files_of
    how = drop(export_root)          # "drop_caches" or "fadvise": which way it was done
    how = drop([path], method="fadvise")

``drop_caches`` (where this process may write ``/proc/sys/vm/drop_caches``, i.e. as root): ``sync``,
then ``3`` -- every clean page and the dentry/inode caches of the whole machine, so per-file formats
also pay for opening their files. Elsewhere ``fadvise``: ``posix_fadvise(POSIX_FADV_DONTNEED)`` on
every file under the export (this needs no privilege and leaves the rest of the machine alone; exports
are synced when written, so their pages are clean). Neither way drops pages that a live memory map
still maps -- close the maps first (a Dataset that holds one: drop the Dataset) -- nor pages another
process maps.
"""

from __future__ import annotations

import os
from pathlib import Path

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
METHODS = ("auto", "drop_caches", "fadvise")


def files_of(paths) -> list[Path]:
    """Every regular file of ``paths`` (a file, a folder searched recursively, or a list of them)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.is_symlink()))
        elif p.is_file():
            out.append(p)
    return out


def fadvise_dontneed(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def can_drop_all() -> bool:
    return os.access(DROP_CACHES, os.W_OK)


def drop(paths, method: str = "auto") -> str:
    """Drop the pages of ``paths`` (see files_of); returns the method used."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; valid: {', '.join(METHODS)}")
    if method == "auto":
        method = "drop_caches" if can_drop_all() else "fadvise"
    if method == "drop_caches":
        os.sync()
        DROP_CACHES.write_text("3\n")
        return method
    for f in files_of(paths):
        fadvise_dontneed(f)
    return method
