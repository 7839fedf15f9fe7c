"""Memory the run really holds (the main process and its DataLoader workers), sampled, and the budget.

    from pipeline.system.memory import MemorySampler, snapshot
    print(snapshot().metrics())              # one reading now: {"used_mb": ..., "uss_workers_mb": ...}
    with MemorySampler(interval_s=0.5, budget_mb=2000) as mem:   # or mem.start(device) ... mem.stop()
        mem.mark_epoch(0)                    # epoch boundaries, for the timeline
        ...                                  # a background thread samples while this runs
        mem.check()                          # raises MemoryBudgetExceeded once a sample crossed the budget
        peaks = mem.take_epoch()             # peaks since the last call
        rows = mem.drain()                   # samples not handed out yet (to log them in one batch)
    mem.peak, mem.samples, mem.epoch_marks

The headline figure ``used_mb`` is PSS of anonymous and shared memory summed over the process tree
(``Snapshot`` says what each figure is). The budget is enforced by measurement: every sample compares
``used_mb`` with it; the training loop calls ``check()`` each step.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass

import psutil

from pipeline.metrics import PEAK_FIGURES

MB = 1024 * 1024
_FIELDS = {
    "Pss_Anon:": "anon",
    "Pss_Shmem:": "shmem",
    "Pss_File:": "file",
    "Private_Clean:": "private",
    "Private_Dirty:": "private",
    "Private_Hugetlb:": "private",
}
# figures whose maximum over the run is meaningful (system_available_mb is tracked as a minimum): the
# metric registry's list, defined once there
PEAK_KEYS = PEAK_FIGURES
PEAK_KEYS = (
    "used_mb",
    "mapped_file_mb",
    "rss_main_mb",
    "used_main_mb",
    "used_workers_mb",
    "uss_main_mb",
    "uss_workers_mb",
    "system_used_mb",
    "cuda_allocated_mb",
    "cuda_reserved_mb",
)


class MemoryBudgetExceeded(RuntimeError):
    """The sampled ``used_mb`` went over ``trainer.memory_budget_mb``."""

    def __init__(self, budget_mb: float, sample: "Snapshot", where: str = ""):
        self.budget_mb, self.sample = budget_mb, sample
        workers = f" + {sample.workers} workers {sample.used_workers_mb:.1f} MB" if sample.workers else ""
        super().__init__(
            f"Memory budget exceeded: memory/used_mb reached {sample.used_mb:.1f} MB "
            f"(main {sample.used_main_mb:.1f} MB{workers}) > trainer.memory_budget_mb={budget_mb:g} MB"
            f"{' ' + where if where else ''}. Use an out-of-core storage format instead of ram, "
            "fewer workers or a smaller batch, or raise the budget."
        )


@dataclass
class Snapshot:
    """One reading. PSS, not RSS: summed RSS would count the pages forked workers share once per process.
    A memory-mapped file's touched pages show in RSS and USS, but the kernel can drop them at any time:
    they are ``mapped_file_mb``, apart from ``used_mb``."""

    t: float  # wall clock, seconds since the epoch
    used_mb: float  # Pss_Anon + Pss_Shmem (/proc/<pid>/smaps_rollup), main process + its children
    mapped_file_mb: float  # Pss_File: mapped file pages (reclaimable page cache)
    rss_main_mb: float
    used_main_mb: float  # used_mb split by process kind
    used_workers_mb: float
    uss_main_mb: float  # private pages (USS): what a process frees on exit
    uss_workers_mb: float  # the same for the workers (the copy-on-read guard watches it)
    workers: int
    system_available_mb: float  # MemAvailable
    system_used_mb: float  # MemTotal - MemAvailable: what `free` shows as used
    cuda_allocated_mb: float | None = None  # on a CUDA device
    cuda_reserved_mb: float | None = None

    @property
    def processes(self) -> int:
        return 1 + self.workers

    def metrics(self) -> dict[str, float]:
        """Every figure but the time, as floats; CUDA figures only when measured."""
        return {k: float(v) for k, v in asdict(self).items() if k != "t" and v is not None}


def _parts(proc: psutil.Process) -> dict[str, float]:
    """PSS split into anon/shmem/file plus USS ("private"), in bytes; psutil's figures off Linux."""
    try:
        with open(f"/proc/{proc.pid}/smaps_rollup") as fh:
            parts = {"anon": 0.0, "shmem": 0.0, "file": 0.0, "private": 0.0}
            for line in fh:
                key = _FIELDS.get(line.split(None, 1)[0])
                if key:
                    parts[key] += float(line.split()[1]) * 1024
            return parts
    except FileNotFoundError:
        if os.path.isdir("/proc"):
            raise ProcessLookupError(proc.pid)  # on Linux: the process has gone
        info = proc.memory_full_info()
        pss = float(getattr(info, "pss", info.rss))
        return {"anon": pss, "shmem": 0.0, "file": 0.0, "private": float(getattr(info, "uss", pss))}


def _cuda(device) -> tuple[float | None, float | None]:
    if device is None or getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return None, None
    import torch

    return torch.cuda.memory_allocated(device) / MB, torch.cuda.memory_reserved(device) / MB


def snapshot(proc: psutil.Process | None = None, device=None) -> Snapshot:
    """One reading of the process ``proc`` (default: this one) and all its descendants."""
    main = proc or psutil.Process()
    t = time.time()
    main_parts = _parts(main)
    used_w = uss_w = file_w = 0.0
    workers = 0
    for p in main.children(recursive=True):
        try:
            parts = _parts(p)
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError, OSError):
            continue  # a worker that exited between listing and reading
        used_w += parts["anon"] + parts["shmem"]
        uss_w += parts["private"]
        file_w += parts["file"]
        workers += 1
    used_main = main_parts["anon"] + main_parts["shmem"]
    vm = psutil.virtual_memory()
    cuda_alloc, cuda_res = _cuda(device)
    return Snapshot(
        t=t,
        used_mb=(used_main + used_w) / MB,
        mapped_file_mb=(main_parts["file"] + file_w) / MB,
        rss_main_mb=main.memory_info().rss / MB,
        used_main_mb=used_main / MB,
        used_workers_mb=used_w / MB,
        uss_main_mb=main_parts["private"] / MB,
        uss_workers_mb=uss_w / MB,
        workers=workers,
        system_available_mb=vm.available / MB,
        system_used_mb=(vm.total - vm.available) / MB,
        cuda_allocated_mb=cuda_alloc,
        cuda_reserved_mb=cuda_res,
    )


# The sampler thread's share of one core, at most: reading /proc/<pid>/smaps_rollup walks the process's page
# tables (7-12 ms for a process that has imported torch, here), so a job with 4 loader workers spends ~60 ms a
# sample; at the default 0.5 s that would be 12% of a core taken from training on a 2-core machine.
MAX_CPU_SHARE = 0.02


class MemorySampler:
    """Samples ``snapshot()`` on a background thread; keeps the series, peaks and the budget.

    The thread waits ``interval_s`` between samples, or longer when a sample costs more than
    ``MAX_CPU_SHARE`` of that wait (many processes to read). ``sample_soon()`` asks for a sample without
    taking it in the caller's thread, taken only if processes appeared since the last such request: the
    training loop asks when an epoch's workers are first alive, which for persistent workers is once."""

    def __init__(self, interval_s: float = 0.5, budget_mb: float | None = None, device=None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s={interval_s!r} must be > 0")
        self.interval_s, self.budget_mb, self.device = interval_s, budget_mb, device
        self._proc = psutil.Process()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._soon = threading.Event()
        self._known: set[int] = set()  # descendants seen by the last sample_soon() request
        self._thread: threading.Thread | None = None
        self.cost_s = 0.0  # what the last sample took (wall seconds)
        self._epoch: dict[str, float] = {}
        self._drained = 0
        self.samples: list[Snapshot] = []
        self.epoch_marks: list[tuple[int, float]] = []  # (epoch, wall time it started)
        self.peak: dict[str, float] = {}
        self.exceeded: Snapshot | None = None  # first sample over the budget

    def sample(self) -> Snapshot:
        t0 = time.perf_counter()
        s = snapshot(self._proc, self.device)
        self.cost_s = time.perf_counter() - t0
        values = s.metrics()
        with self._lock:
            self.samples.append(s)
            for key in PEAK_KEYS:
                if key in values:
                    self._epoch[key] = max(self._epoch.get(key, 0.0), values[key])
                    self.peak[key] = max(self.peak.get(key, 0.0), values[key])
            low = self.peak.get("min_system_available_mb", float("inf"))
            self.peak["min_system_available_mb"] = min(low, s.system_available_mb)
            if self.budget_mb is not None and self.exceeded is None and s.used_mb > self.budget_mb:
                self.exceeded = s
        return s

    def check(self, where: str = "") -> None:
        """Raise MemoryBudgetExceeded if any sample so far went over the budget."""
        if self.exceeded is not None:
            raise MemoryBudgetExceeded(self.budget_mb, self.exceeded, where)

    def mark_epoch(self, epoch: int) -> None:
        with self._lock:
            self.epoch_marks.append((epoch, time.time()))

    def take_epoch(self) -> dict[str, float]:
        """Peaks since the previous call (sampling once more now), then start a new window."""
        self.sample()
        with self._lock:
            out, self._epoch = self._epoch, {}
        return out

    def drain(self) -> list[tuple[int, Snapshot]]:
        """(sample index, sample) for every sample not returned by an earlier call."""
        with self._lock:
            start, self._drained = self._drained, len(self.samples)
            return list(enumerate(self.samples[start:], start))

    def sample_soon(self) -> None:
        """Have the background thread take a sample now (right away where no thread runs)."""
        if self._thread is None:
            self.sample()
        else:
            self._soon.set()

    def wait_s(self) -> float:
        """Seconds the thread waits before its next sample: the interval, or more when sampling is costly."""
        return max(self.interval_s, self.cost_s / MAX_CPU_SHARE)

    def _run(self) -> None:
        while not self._stop.is_set():
            asked = self._soon.wait(self.wait_s())
            self._soon.clear()
            if self._stop.is_set():
                return
            try:
                if asked:
                    pids = {p.pid for p in self._proc.children(recursive=True)}
                    new, self._known = bool(pids - self._known), pids
                    if not new:
                        continue
                self.sample()
            except Exception:  # never let a failed reading kill the sampler
                continue

    def start(self, device=None) -> "MemorySampler":
        """Take a first sample and start the background thread (``device``: for CUDA figures)."""
        if device is not None:
            self.device = device
        self.sample()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "MemorySampler":
        """Stop the thread and take a last sample (no-op if never started)."""
        if self._thread is not None:
            self._stop.set()
            self._soon.set()
            self._thread.join()
            self._thread = None
            self.sample()
        return self

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
