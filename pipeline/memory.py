"""Memory the run really holds, for the main process and its DataLoader workers.

    from pipeline.memory import MemorySampler, snapshot
    print(snapshot())                        # one reading now
    with MemorySampler(interval_s=0.25) as mem:
        ...                                  # a background thread samples while this runs
        peaks = mem.take_epoch()             # peaks since the last call

``used_mb`` is the headline figure: the proportional set size of anonymous and shared memory
(``Pss_Anon + Pss_Shmem`` from ``/proc/<pid>/smaps_rollup``) summed over the main process and its
children. Summing RSS would count pages that forked workers share once per process, and a
memory-mapped file's touched pages show up in RSS and USS although the kernel can drop them at
any time; those mapped file pages are reported apart as ``mapped_file_mb`` (``Pss_File``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import psutil

MB = 1024 * 1024
_FIELDS = {"Pss_Anon:": "anon", "Pss_Shmem:": "shmem", "Pss_File:": "file"}


@dataclass
class Snapshot:
    used_mb: float
    mapped_file_mb: float
    rss_main_mb: float
    processes: int


def _pss_parts(proc: psutil.Process) -> dict[str, float]:
    """PSS split into anon/shmem/file in bytes; falls back to psutil's total PSS off Linux."""
    try:
        with open(f"/proc/{proc.pid}/smaps_rollup") as fh:
            parts = {"anon": 0.0, "shmem": 0.0, "file": 0.0}
            for line in fh:
                key = _FIELDS.get(line.split(None, 1)[0])
                if key:
                    parts[key] = float(line.split()[1]) * 1024
            return parts
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        info = proc.memory_full_info()
        return {"anon": float(getattr(info, "pss", info.rss)), "shmem": 0.0, "file": 0.0}


def snapshot(proc: psutil.Process | None = None) -> Snapshot:
    main = proc or psutil.Process()
    used = mapped = 0.0
    n = 0
    for p in [main, *main.children(recursive=True)]:
        try:
            parts = _pss_parts(p)
        except (psutil.NoSuchProcess, ProcessLookupError, OSError):
            continue  # a worker that exited between listing and reading
        used += parts["anon"] + parts["shmem"]
        mapped += parts["file"]
        n += 1
    return Snapshot(used / MB, mapped / MB, main.memory_info().rss / MB, n)


class MemorySampler:
    """Samples ``snapshot()`` on a background thread and keeps per-epoch and overall peaks."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self._proc = psutil.Process()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._epoch: dict[str, float] = {}
        self.peak: dict[str, float] = {}

    def sample(self) -> Snapshot:
        s = snapshot(self._proc)
        with self._lock:
            for key, value in (
                ("used_mb", s.used_mb),
                ("mapped_file_mb", s.mapped_file_mb),
                ("rss_main_mb", s.rss_main_mb),
            ):
                self._epoch[key] = max(self._epoch.get(key, 0.0), value)
                self.peak[key] = max(self.peak.get(key, 0.0), value)
        return s

    def take_epoch(self) -> dict[str, float]:
        """Peaks since the previous call (sampling once more now), then start a new window."""
        self.sample()
        with self._lock:
            out, self._epoch = self._epoch, {}
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "MemorySampler":
        self.sample()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
