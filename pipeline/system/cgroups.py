"""Memory control groups: the limit this process is under, and a memory-capped group to run work in.

    from pipeline.system.cgroups import CgroupUnavailable, MemoryCgroup, memory_limit
    memory_limit()                         # bytes, the lowest limit on this process's group and its
                                           # ancestors (v2 memory.max or v1 memory.limit_in_bytes); None
    cpu_limit()                            # CPUs the CPU controller's quota allows (2.5 = 250 ms per
                                           # 100 ms, v2 cpu.max or v1 cpu.cfs_quota_us); None: no quota
    group = memory_group(); oom_kills(group)   # this process's memory group; its OOM-kill count
    try:
        with MemoryCgroup(1 << 30, prefix="bench") as cg:   # this process (or pid=N) moved in
            ...                            # children forked now start inside the group
            cg.move_out(); ...; cg.move_in()   # step out for a while (moves are cheap)
        print(cg.peak_bytes, cg.oom_kills) # kept after the group is removed
    except CgroupUnavailable as err:       # not root, no memory controller, ...: says why
        log.warning("running without a memory limit: %s", err)

The group is created under this process's own memory group (so it stays inside whatever already
contains the job; cgroup v2: the nearest of that group and the root that hands the memory controller to
its children), named ``<prefix>-<pid>-<n>``; groups of that prefix left by a process that died (an OOM
kill of the process that created them) are removed on the next creation. The limit charges the page
cache too, so work inside it cannot cache more than the limit; swap is capped as well where the kernel
offers it. Charges do not move with a process: what a process held before it was moved in stays charged
to its old group, and only memory it allocates and pages it brings into the cache afterwards count. On
exit every process still in the group (e.g. a persistent worker) is moved back to where the first moved
process came from, and the group is removed; ``peak_bytes`` (v1 ``memory.max_usage_in_bytes``, v2
``memory.peak``) and ``oom_kills`` (the ``oom_kill`` line of v1 ``memory.oom_control`` / v2
``memory.events``) are read just before.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from pathlib import Path

UNLIMITED = 1 << 60  # v1 writes "no limit" as 9223372036854771712
_counter = itertools.count()


class CgroupUnavailable(RuntimeError):
    """No memory-capped group can be created here; the message says why."""


def _mounts() -> dict[str, tuple[Path, str]]:
    """{"v2": (mount point, mount root), "v1": (...)} for the cgroup2 and the v1 memory hierarchies."""
    found: dict[str, tuple[Path, str]] = {}
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields, (fstype, _source, options) = left.split(), right.split()[:3]
            if fstype == "cgroup2":
                found.setdefault("v2", (Path(fields[4]), fields[3]))
            elif fstype == "cgroup" and "memory" in options.split(","):
                found.setdefault("v1", (Path(fields[4]), fields[3]))
    return found


def _group_dir(version: str, mount: Path, root: str, pid: int | str = "self") -> Path:
    """The folder of ``pid``'s group in that hierarchy (from /proc/<pid>/cgroup)."""
    with open(f"/proc/{pid}/cgroup") as fh:
        for line in fh:
            _id, controllers, path = line.rstrip("\n").split(":", 2)
            if (version == "v2" and _id == "0") or (version == "v1" and "memory" in controllers.split(",")):
                if root != "/" and path.startswith(root):
                    path = path[len(root) :]
                return mount / path.lstrip("/")
    raise CgroupUnavailable(f"/proc/{pid}/cgroup names no {version} memory group")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def memory_limit() -> int | None:
    """The lowest memory limit in bytes on this process's group and its ancestors, v2 and v1; None if
    there is none (or no cgroup filesystem to read)."""
    try:
        mounts = _mounts()
    except OSError:
        return None
    limits = []
    for version, (mount, root) in mounts.items():
        name = "memory.max" if version == "v2" else "memory.limit_in_bytes"
        try:
            folder = _group_dir(version, mount, root)
        except (OSError, CgroupUnavailable):
            continue
        for d in (folder, *folder.parents):
            value = _read(d / name)
            if value and value != "max" and int(value) < UNLIMITED:
                limits.append(int(value))
            if d == mount:
                break
    return min(limits) if limits else None


def cpu_limit() -> float | None:
    """The CPUs the lowest CPU quota on this process's group and its ancestors allows (quota / period: v2
    ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None if no group has one (or there is no
    cgroup filesystem to read). Affinity (``os.sched_getaffinity``) is another, separate limit."""
    try:
        with open("/proc/self/mountinfo") as fh:
            lines = fh.read().splitlines()
        with open("/proc/self/cgroup") as fh:
            own = [line.split(":", 2) for line in fh.read().splitlines()]
    except OSError:
        return None
    limits = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, parts = left.split(), right.split()
        if len(parts) < 3 or len(fields) < 5:
            continue
        fstype, options = parts[0], parts[2].split(",")
        v2 = fstype == "cgroup2"
        if not (v2 or (fstype == "cgroup" and "cpu" in options)):
            continue
        mount, root = Path(fields[4]), fields[3]
        path = next(
            (p for _id, ctl, p in own if (v2 and _id == "0") or (not v2 and "cpu" in ctl.split(","))), None
        )
        if path is None:
            continue
        if root != "/" and path.startswith(root):
            path = path[len(root) :]
        folder = mount / path.lstrip("/")
        for d in (folder, *folder.parents):
            if v2:
                quota, _, period = (_read(d / "cpu.max") or "max").partition(" ")
            else:
                quota, period = _read(d / "cpu.cfs_quota_us") or "-1", _read(d / "cpu.cfs_period_us") or ""
            if quota.lstrip("-").isdigit() and int(quota) > 0 and period.isdigit() and int(period) > 0:
                limits.append(int(quota) / int(period))
            if d == mount:
                break
    return min(limits) if limits else None


def memory_group() -> Path | None:
    """The folder of this process's memory group: v2 where it has ``memory.events``, else the v1 memory
    hierarchy's; None when there is none (or no cgroup filesystem to read)."""
    try:
        mounts = _mounts()
    except OSError:
        return None
    for version, stat in (("v2", "memory.events"), ("v1", "memory.oom_control")):
        if version not in mounts:
            continue
        try:
            folder = _group_dir(version, *mounts[version])
        except (OSError, CgroupUnavailable):
            continue
        if (folder / stat).exists():
            return folder
    return None


def oom_kills(group: str | Path | None) -> int | None:
    """How many processes the OOM killer has killed in the memory group ``group`` (the ``oom_kill`` line
    of v2 ``memory.events`` / v1 ``memory.oom_control``); None when neither can be read (a removed group)."""
    for name in ("memory.events", "memory.oom_control"):
        if group and _read(Path(group) / name) is not None:
            return _stat_line(Path(group) / name, "oom_kill")
    return None


def _stat_line(path: Path, key: str) -> int:
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


class MemoryCgroup:
    """A memory-capped group (v2 where its memory controller is available, else v1), removed on exit."""

    def __init__(self, limit_bytes: int, prefix: str = "pipeline", pid: int | None = None, join=True):
        if int(limit_bytes) <= 0:
            raise ValueError(f"limit_bytes={limit_bytes!r} must be > 0")
        self.limit_bytes, self.prefix, self.pid, self.join = int(limit_bytes), prefix, pid, join
        self.path: Path | None = None
        self.version = ""
        self.origins: dict[int, Path] = {}
        self.peak_bytes = 0
        self.oom_kills = 0

    # ---- where ----

    def _parent(self) -> tuple[str, Path, str]:
        mounts = _mounts()
        if "v2" in mounts:
            mount, root = mounts["v2"]
            if "memory" in (_read(mount / "cgroup.controllers") or "").split():
                own = _group_dir("v2", mount, root)
                for d in (own, mount):
                    if "memory" in (_read(d / "cgroup.subtree_control") or "").split():
                        return "v2", d, root
                if "v1" not in mounts:
                    raise CgroupUnavailable(
                        f"cgroup v2: neither {own} nor {mount} hands the memory controller to child "
                        "groups (cgroup.subtree_control lacks 'memory')"
                    )
        if "v1" in mounts:
            mount, root = mounts["v1"]
            return "v1", _group_dir("v1", mount, root), root
        raise CgroupUnavailable("no cgroup v2 memory controller and no cgroup v1 memory hierarchy mounted")

    def _remove_stale(self, parent: Path) -> None:
        pattern = re.compile(rf"{re.escape(self.prefix)}-(\d+)-\d+")
        for d in parent.iterdir():
            m = pattern.fullmatch(d.name)
            if m and d.is_dir() and not Path(f"/proc/{m.group(1)}").exists():
                if not _read(d / "cgroup.procs"):
                    try:
                        d.rmdir()
                    except OSError:
                        pass

    def _files(self) -> dict[str, str]:
        if self.version == "v2":
            return {"limit": "memory.max", "swap": "memory.swap.max", "peak": "memory.peak"}
        return {"limit": "memory.limit_in_bytes", "swap": "memory.memsw.limit_in_bytes", "peak": ""}

    # ---- lifecycle ----

    def create(self) -> "MemoryCgroup":
        self.version, parent, _root = self._parent()
        self._remove_stale(parent)
        path = parent / f"{self.prefix}-{os.getpid()}-{next(_counter)}"
        try:
            path.mkdir()
        except OSError as err:
            raise CgroupUnavailable(
                f"cannot create the cgroup {path}: {err.strerror} (creating cgroups needs root or a "
                "delegated cgroup)"
            ) from err
        self.path = path
        try:
            (path / self._files()["limit"]).write_text(str(self.limit_bytes))
            swap = path / self._files()["swap"]
            if swap.exists():  # v1: memory+swap >= memory, so this goes after the memory limit
                swap.write_text("0" if self.version == "v2" else str(self.limit_bytes))
        except OSError as err:
            self.path = None
            path.rmdir()
            raise CgroupUnavailable(f"cannot set the memory limit of {path}: {err.strerror}") from err
        return self

    def move_in(self, pid: int | None = None) -> None:
        pid = pid or os.getpid()
        self.origins.setdefault(pid, self._where(pid))
        (self.path / "cgroup.procs").write_text(str(pid))

    def move_out(self, pid: int | None = None) -> None:
        pid = pid or os.getpid()
        origin = self.origins.get(pid) or next(iter(self.origins.values()), self.path.parent)
        (origin / "cgroup.procs").write_text(str(pid))

    def _where(self, pid: int) -> Path:
        mounts = _mounts()
        mount, root = mounts["v2" if self.version == "v2" else "v1"]
        return _group_dir(self.version, mount, root, pid)

    def pids(self) -> list[int]:
        return [int(p) for p in (_read(self.path / "cgroup.procs") or "").split()]

    def read_stats(self) -> None:
        if self.version == "v2":
            peak = _read(self.path / "memory.peak")
            self.peak_bytes = int(peak) if peak and peak.isdigit() else 0
            self.oom_kills = _stat_line(self.path / "memory.events", "oom_kill")
        else:
            self.peak_bytes = int(_read(self.path / "memory.max_usage_in_bytes") or 0)
            self.oom_kills = _stat_line(self.path / "memory.oom_control", "oom_kill")

    def close(self) -> None:
        """Read the figures, move every process left in the group out, remove the group."""
        if self.path is None:
            return
        self.read_stats()
        home = next(iter(self.origins.values()), self.path.parent)
        deadline = time.monotonic() + 5.0
        while True:
            for pid in self.pids():
                try:
                    (self.origins.get(pid, home) / "cgroup.procs").write_text(str(pid))
                except OSError:
                    pass  # exited meanwhile
            try:
                self.path.rmdir()
                break
            except OSError as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cannot remove the cgroup {self.path}: {err.strerror}") from err
                time.sleep(0.05)
        self.path = None

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    def __enter__(self) -> "MemoryCgroup":
        self.create()
        if self.join:
            try:
                self.move_in(self.pid)
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exc) -> None:
        if self.path is not None and self.join:
            try:
                self.move_out(self.pid)
            except OSError:
                pass  # the process has gone; close() empties the group anyway
        self.close()
