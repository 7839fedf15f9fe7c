"""How the loader bench runs each pass of one point: warm or cold page cache, with or without a memory cap.

    from pipeline.bench.conditions import Passes
    with Passes(make_loader, cache="cold", memory_limit_mb=512, drop=[export_root]) as passes:
        p = passes.run()          # one full pass: p.samples, p.seconds, p.disk_bytes, p.first_batch_ms,
                                  # p.samples_per_s (whole pass), p.steady_samples_per_s (after the
                                  # start-up: the 1st batch, or each worker's 1st with Passes(workers=N))
    passes.limit_applied_mb, passes.cgroup_peak_mb

- ``cache="warm"``: one loader for every pass, as training iterates it; the bench runs a warm-up pass
  first. ``cache="cold"``: before EVERY pass the previous loader is released (with its Dataset, so its
  memory maps are closed: pages a live map still maps survive any cache drop) and the export's pages are
  dropped (pipeline.system.page_cache: ``drop_caches`` as root, else ``fadvise`` on each of its files);
  the pass then runs on a fresh loader set to the next epoch, so the order moves on as in training.
- ``memory_limit_mb``: the point gets its own memory-capped cgroup (pipeline.system.cgroups); the bench
  process moves into it for each pass (DataLoader workers started by the pass start inside it) and out
  again after, so the in-RAM baseline passes paired with it run outside. Charges stay where they were
  made: the memory the bench held before the pass (imports, the in-RAM baseline's array) is not charged
  to the cap; the pass's page cache, batches and workers are. Where no cgroup can be created, the reason
  is logged once and the passes run without a cap (``limit_applied_mb`` is then None).
- ``disk_bytes``: bytes fetched from the block device during the pass by the bench process and its
  workers, live or exited (pipeline.system.iocount).
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

from pipeline.system import page_cache
from pipeline.system.cgroups import CgroupUnavailable, MemoryCgroup
from pipeline.system.iocount import disk_read_bytes

log = logging.getLogger(__name__)
_said: set[str] = set()  # reasons already logged (no cgroup, drop method)


def _once(message: str, *args, level=logging.INFO) -> None:
    text = message % args
    if text not in _said:
        _said.add(text)
        log.log(level, "bench: %s", text)


@dataclass
class Pass:
    samples: int
    seconds: float
    disk_bytes: int
    first_batch_ms: float
    first_samples: int = 0  # the first batch's
    startup_ms: float | None = None  # until every worker's first batch (None: the first batch's time)
    startup_samples: int = 0  # the batches of that start-up

    @property
    def samples_per_s(self) -> float:
        """The whole pass, start-up (workers starting, the first read) included."""
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_samples_per_s(self) -> float:
        """After the first batch: what a pass delivers once started (a long epoch's rate)."""
        if self.startup_ms is None:
            rest, samples = self.seconds - self.first_batch_ms / 1e3, self.samples - self.first_samples
        else:
            rest, samples = self.seconds - self.startup_ms / 1e3, self.samples - self.startup_samples
        return samples / rest if rest > 0 and samples > 0 else self.samples_per_s


class Passes:
    def __init__(
        self,
        make_loader,
        cache: str = "warm",
        memory_limit_mb: float | None = None,
        drop=(),
        workers: int = 0,
    ):
        self.make_loader, self.cold, self.drop = make_loader, str(cache) == "cold", list(drop)
        self.startup_batches = max(1, int(workers))  # each worker's first batch is start-up
        self.memory_limit_mb = memory_limit_mb
        self.loader = make_loader()
        self.epoch = 0
        self.cgroup: MemoryCgroup | None = None
        self.limit_applied_mb: float | None = None
        self.cgroup_peak_mb: float | None = None
        self.oom_kills = 0

    def __enter__(self) -> "Passes":
        if self.memory_limit_mb is not None:
            cg = MemoryCgroup(int(self.memory_limit_mb * 2**20), prefix="pipeline-bench", join=False)
            try:
                self.cgroup = cg.create()
                self.limit_applied_mb = float(self.memory_limit_mb)
            except CgroupUnavailable as err:
                why = (
                    f"bench.memory_limit_mb={self.memory_limit_mb:g} not applied, passes run uncapped: {err}"
                )
                _once("%s", why, level=logging.WARNING)
        return self

    def __exit__(self, *exc) -> None:
        if self.cgroup is not None:
            self.cgroup.close()
            self.cgroup_peak_mb, self.oom_kills = self.cgroup.peak_mb, self.cgroup.oom_kills

    def _cold_loader(self) -> None:
        self.loader = None
        gc.collect()  # the old Dataset's memory maps closed before the drop
        how = page_cache.drop(self.drop)
        _once("cold passes: the export's pages dropped before each pass (%s)", how)
        self.loader = self.make_loader()
        self.loader.set_epoch(self.epoch)

    def run(self) -> Pass:
        if self.cold:
            self._cold_loader()
        self.epoch += 1
        if self.cgroup is not None:
            self.cgroup.move_in()
        try:
            before = disk_read_bytes() or 0
            t0 = time.perf_counter()
            it = iter(self.loader)
            first = next(it, None)
            first_ms = (time.perf_counter() - t0) * 1e3
            n = len(first[1]) if first is not None else 0
            startup_ms, startup_n, batches = (first_ms, n, 1) if first is not None else (None, 0, 0)
            for _x, y in it:
                n += len(y)
                batches += 1
                if batches == self.startup_batches:
                    startup_ms, startup_n = (time.perf_counter() - t0) * 1e3, n
            seconds = time.perf_counter() - t0
            if batches < self.startup_batches:  # the pass was all start-up
                startup_ms, startup_n = None, 0
            disk = (disk_read_bytes() or 0) - before
        finally:
            if self.cgroup is not None:
                self.cgroup.move_out()
        first_n = len(first[1]) if first is not None else 0
        return Pass(n, seconds, disk, first_ms, first_n, startup_ms, startup_n)
