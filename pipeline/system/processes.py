"""Processes on this machine: who a job is, whether a recorded process still runs, and why it died.

    from pipeline.system import processes
    me = processes.identity()                   # Identity(host, pid, start, host_id)
    processes.state(pid, start)                 # RUNNING | GONE | OTHER (the pid now runs another process)
    processes.kernel_oom_kill(pid, since)       # the kernel log's "Killed process <pid>" line, or None

``host_id`` is the kernel's boot id plus this process's pid namespace: two containers that share a
host name (``--network host``) or a host rebooted since are not "the same host", so a pid is only
ever looked up where it means the same process. Nothing here needs privileges: the kernel log is read
only where ``/dev/kmsg`` is readable (``kernel.dmesg_restrict``), and a reading that fails is None.
A memory cgroup's OOM-kill count: pipeline/system/cgroups.py (``memory_group``, ``oom_kills``).
"""

from __future__ import annotations

import errno
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil

RUNNING, GONE, OTHER = "running", "gone", "other"
START_TOLERANCE_S = 2.0  # psutil's start time is boot time + ticks; boot time may shift by ~1 s (NTP)
KILLED = re.compile(r"Killed process (\d+) \(([^)]*)\)")


@dataclass(frozen=True)
class Identity:
    host: str
    pid: int
    start: float  # process start, seconds since the epoch
    host_id: str  # boot id + pid namespace: where ``pid`` names this process


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def host_id() -> str:
    boot = (_read("/proc/sys/kernel/random/boot_id") or "").strip()
    try:
        ns = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        ns = ""
    return f"boot={boot or '?'} {ns or 'pid:[?]'}"


def identity() -> Identity:
    me = psutil.Process()
    return Identity(socket.gethostname(), me.pid, me.create_time(), host_id())


def state(pid: int, start: float) -> str:
    """RUNNING: ``pid`` is the process that started at ``start``; OTHER: the pid was reused; GONE: no
    such process (a zombie, dead but not yet collected by its parent, counts as gone)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return GONE
        return RUNNING if abs(proc.create_time() - start) <= START_TOLERANCE_S else OTHER
    except psutil.NoSuchProcess:
        return GONE
    except psutil.AccessDenied:  # it exists; whose it is cannot be told: never call it gone
        return RUNNING


def kernel_oom_kill(pid: int, since: float) -> str | None:
    """The kernel's OOM-kill message for ``pid`` logged after ``since`` (seconds since the epoch), e.g.
    ``"Memory cgroup out of memory: Killed process 4242 (python) total-vm:..."``; None when there is
    none or ``/dev/kmsg`` is not readable without privilege."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    after_us = (since - psutil.boot_time() - START_TOLERANCE_S) * 1e6
    found = None
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except OSError as err:
                if err.errno == errno.EPIPE:  # a record was overwritten while reading: go on
                    continue
                break  # EAGAIN: the end of the buffer
            head, _, message = record.partition(";")
            fields = head.split(",")
            match = KILLED.search(message)
            if match and int(match.group(1)) == pid and len(fields) > 2 and int(fields[2]) >= after_us:
                found = message.splitlines()[0].strip()
    finally:
        os.close(fd)
    return found
