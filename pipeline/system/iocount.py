"""Bytes a job really fetched from the block device: the main process and its DataLoader workers.

    from pipeline.system.iocount import disk_read_bytes
    before = disk_read_bytes()            # None where the platform has no per-process I/O counters
    ...                                   # read data, with or without workers (persistent or not)
    read_mb = (disk_read_bytes() - before) / 1e6

Counted: ``read_bytes`` of ``/proc/<pid>/io`` (via psutil), i.e. bytes whose reads this process sent to
a block device -- page-cache misses, readahead included, and O_DIRECT reads -- for

- this process, all its threads (a prefetch thread, the memory sampler);
- every live descendant (DataLoader workers, a forkserver and the workers it started);
- every descendant that has exited and was waited for: Linux adds a reaped child's counters to its
  parent's ``/proc/<pid>/io``, so workers that already exited (non-persistent workers exit at each
  epoch end) stay counted in this process's figure. Measured on kernel 6.18: a child's 64 MiB read
  appeared in the parent's ``read_bytes`` once reaped, equal to ``getrusage(RUSAGE_CHILDREN).ru_inblock
  * 512`` -- adding that figure as well would count those bytes twice, so it is not added.

Not counted: reads served from the page cache (a warm data set reads ~0 bytes); pages another process
(or an earlier run) already brought into the cache; filesystems without a block device (tmpfs, NFS,
FUSE); writes. A child that exited but has not been reaped yet is read from its own entry while it
lasts; if it is reaped in the middle of a reading, the reading is taken again.
"""

from __future__ import annotations

import psutil


def _own(proc: psutil.Process) -> int:
    return int(proc.io_counters().read_bytes)


def disk_read_bytes(pid: int | None = None) -> int | None:
    """Bytes read from block devices so far by process ``pid`` (default: this one) and its descendants,
    live or reaped; None where psutil offers no I/O counters (not Linux/Windows/BSD)."""
    proc = psutil.Process(pid)
    if not hasattr(proc, "io_counters"):
        return None
    own = _own(proc)
    for _ in range(3):  # a child reaped between the two readings of ``own`` moves into it: read again
        kids = 0
        for child in proc.children(recursive=True):
            try:
                kids += _own(child)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue  # gone (its bytes are in its parent's figure once reaped) or not ours
        again = _own(proc)
        if again == own:
            break
        own = again
    return own + kids
