"""The CPUs this process may use: its scheduler affinity, capped by its control group's CPU quota.

    from pipeline.system.cpus import usable_cpus, cpu_quota
    usable_cpus()      # e.g. 2: min(len(sched_getaffinity), floor(quota)), at least 1
    cpu_quota()        # CPUs the cgroup's quota allows (v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us,
                       # the lowest over the group and its ancestors), or None when unlimited

``os.cpu_count()`` counts the machine's CPUs, not those a container or ``taskset`` lets the process run on:
a pool sized by it oversubscribes a container limited to 2 CPUs of 64 thirty-two times over. A quota of 1.5
CPUs gives 1 (a second process would only share the first one's time).
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _groups() -> list[tuple[str, Path]]:
    """(version, folder of this process's group) for the cgroup2 hierarchy and the v1 cpu hierarchy."""
    mounts: dict[str, tuple[Path, str]] = {}
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields, (fstype, _source, options) = left.split(), right.split()[:3]
                if fstype == "cgroup2":
                    mounts.setdefault("v2", (Path(fields[4]), fields[3]))
                elif fstype == "cgroup" and "cpu" in options.split(","):
                    mounts.setdefault("v1", (Path(fields[4]), fields[3]))
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        version = "v2" if _id == "0" else ("v1" if "cpu" in controllers.split(",") else None)
        if version is None or version not in mounts:
            continue
        mount, root = mounts[version]
        if root != "/" and path.startswith(root):
            path = path[len(root) :]
        found.append((version, mount / path.lstrip("/")))
    return found


def cpu_quota() -> float | None:
    """CPUs the lowest CPU quota on this process's groups (and their ancestors) allows; None: no quota."""
    quotas = []
    for version, folder in _groups():
        mount = folder
        while mount.parent != mount and (mount.parent / "cgroup.procs").exists():
            mount = mount.parent  # the hierarchy's root: its topmost folder with cgroup.procs
        for d in (folder, *folder.parents):
            if version == "v2":
                parts = (_read(d / "cpu.max") or "max").split()
                if parts[0] != "max" and len(parts) == 2:
                    quotas.append(int(parts[0]) / int(parts[1]))
            else:
                quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
                if quota and period and int(quota) > 0:
                    quotas.append(int(quota) / int(period))
            if d == mount:
                break
    return min(quotas) if quotas else None


def usable_cpus() -> int:
    """The CPUs this process may use: affinity, capped by the quota (module docstring); at least 1."""
    quota = cpu_quota()
    cpus = affinity_cpus()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)
