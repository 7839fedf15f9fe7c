"""Memory a job may still take, and the check a format that loads its data into memory makes first.

    from pipeline.system.headroom import DoesNotFit, headroom, require
    h = headroom()        # h.bytes, h.limit_bytes (cgroup; None), h.used_bytes, h.available_bytes
    require(need_bytes, "storage=ram holds the 10,586 + 2,647 samples of the split")   # or DoesNotFit

``headroom().bytes`` is the lower of
- the memory limit of this process's cgroup (v2 ``memory.max`` / v1 ``memory.limit_in_bytes``, the
  lowest on its group and the groups above; pipeline.system.cgroups.memory_limit) minus what this job
  already uses (``memory/used_mb`` of pipeline.system.memory: anonymous + shared memory of the process
  and its children, which are what the limit cannot reclaim), and
- ``MemAvailable`` of ``/proc/meminfo`` (the kernel's estimate of what can be allocated without
  swapping; it is already net of what every process, this one included, uses).
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from pipeline.system.cgroups import memory_limit
from pipeline.system.memory import MB, snapshot


class DoesNotFit(MemoryError):
    """The data a job would load is larger than the memory it may use."""


@dataclass
class Headroom:
    limit_bytes: int | None
    used_bytes: int
    available_bytes: int  # MemAvailable

    @property
    def bytes(self) -> int:
        under_limit = self.limit_bytes - self.used_bytes if self.limit_bytes is not None else None
        low = min(self.available_bytes, under_limit) if under_limit is not None else self.available_bytes
        return max(low, 0)

    def describe(self) -> str:
        avail = f"MemAvailable {self.available_bytes / MB:,.0f} MB"
        if self.limit_bytes is None:
            return f"{avail}; no cgroup memory limit"
        return (
            f"cgroup memory limit {self.limit_bytes / MB:,.0f} MB minus {self.used_bytes / MB:,.0f} MB this "
            f"job already uses = {max(self.limit_bytes - self.used_bytes, 0) / MB:,.0f} MB; {avail}"
        )


def headroom() -> Headroom:
    return Headroom(memory_limit(), int(snapshot().used_mb * MB), int(psutil.virtual_memory().available))


def require(need_bytes: int, what: str, remedy: str = "") -> Headroom:
    """Raise DoesNotFit unless ``need_bytes`` fit in the headroom; the message names both figures."""
    h = headroom()
    if need_bytes > h.bytes:
        raise DoesNotFit(
            f"{what}: {need_bytes / MB:,.0f} MB, more than the {h.bytes / MB:,.0f} MB this job can still use "
            f"({h.describe()}).{' ' + remedy if remedy else ''}"
        )
    return h


def memory_room() -> int:
    """The memory this job may fill, page cache included: RAM, or its cgroup's limit where lower (what a
    reader compares an export's size with to tell whether it can stay cached between epochs)."""
    total = int(psutil.virtual_memory().total)
    limit = memory_limit()
    return min(total, limit) if limit is not None else total
