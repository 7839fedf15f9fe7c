"""Short measured trials of the real training step: the job's loaders, model and optimizer, other settings.

    trials = Trials(cfg, device, exports, cold=False)       # exports: {storage: (Export, Split)}
    load_ms, step_ms = trials.serial_figures(candidate)      # the serial loader alone; the step alone
    t = trials.run(candidate, seconds=5.0)                   # a window: t.samples_per_s, t.rate, t.data_wait
    d = trials.duel(default, other, seconds=20.0)            # both live, alternating: d.ratios, d.gain

**A candidate, live** (``Live``): what the job builds with the candidate's settings -- ``stages.prepare``
(threads, seeds), ``stages.make_loaders``, ``stages.make_model``, ``build_optimizer`` -- training with
``pipeline.training.train.train_pass``, the step ``fit`` runs, on the train loader's batches epoch after
epoch (so a trial on a small split never waits for a pass to restart). A warm-up (workers starting, the
first buffers read, the first steps) is left out of every figure.

**A window** (``run``): the step runs for ``seconds``; the trial records samples/s (the window's samples over
its seconds, as a job's epoch is measured), the typical rate (the median over ``SLICE_S`` slices of the
window: a neighbour on a shared machine that takes the cores for part of the window moves it less), the
share of the time spent waiting for the next batch, the disk bytes read per byte delivered
(pipeline.system.iocount, workers included) and the job's memory (pipeline.system.memory) with its workers
alive. Then the loaders are closed, with their workers.

**A duel** (``duel``): two candidates live at once take turns, ``DUEL_SLICE_S`` each, in the order A B B A
A B ... (a steady drift of the machine's speed falls on both alike); each turn first lets the candidate
settle (the batches its workers or prefetch thread prepared while it waited are taken and not counted, and
the other's workers finish refilling), then counts. The ratio of B's rate to A's in each adjacent pair of
turns is a comparison under the same conditions; their median is B's gain. A shared machine's load comes
and goes over seconds (on this project's 2-core machine a neighbour's burst slowed the same setting 2-8x
from one window to the next), so only such side-by-side turns tell two settings apart.

Conditions: with ``cold`` (an export that does not fit the page cache) the export's pages are dropped
before each build (``fadvise`` on its files only: the rest of the machine keeps its cache), so every trial
reads from the disk as every epoch of the job will; otherwise the tuner reads the export into the cache
once before the trials, as the job's epochs after the first find it.

``transform.normalize``: the model is built with neutral figures (mean 0, std 1) of the right shape, not the
train split's (reading the whole split for them would take much of the budget); the step does the same
arithmetic either way.
"""

from __future__ import annotations

import gc
import itertools
import logging
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import stages
from pipeline.system.iocount import disk_read_bytes
from pipeline.system.memory import snapshot
from pipeline.system.page_cache import drop
from pipeline.training.train import build_optimizer, train_pass
from pipeline.tune.space import SHARDED, Candidate

log = logging.getLogger(__name__)

QUANTILE = 0.25  # of the serial loader's per-batch times (interference only ever adds time)
SLICE_S = 0.5  # a window's rate is also taken over slices this long; their median is the typical rate
DUEL_SLICE_S = 1.0  # a duel's turn, counted part
SETTLE_S = 0.3  # a duel's turn, settling part (at least, and at least the batches prepared ahead)


@dataclass
class Trial:
    candidate: Candidate
    samples_per_s: float  # the window's samples / its seconds, as a job's epoch is measured
    data_wait: float  # share of the window spent waiting for the next batch
    read_amplification: float | None  # disk bytes / stored bytes delivered; None where nothing was counted
    read_mb: float
    first_batch_ms: float
    memory_mb: float  # memory/used_mb of the job (main + workers) at the window's end
    seconds: float
    samples: int
    stage: str = "trial"  # trial (screening) | duel
    error: str | None = None
    round: int = 0  # 0: screening; 1..: the duel it was measured in
    typical_samples_per_s: float = 0.0  # the median rate of the window's slices (module docstring)

    @property
    def ok(self) -> bool:
        return self.error is None and self.samples > 0

    @property
    def rate(self) -> float:
        """What trials are ranked by: the typical rate (the window's own where it had too few slices)."""
        return self.typical_samples_per_s or self.samples_per_s


def failed(c: Candidate, err: BaseException, stage: str = "trial", round: int = 0) -> Trial:
    return Trial(c, 0.0, 0.0, None, 0.0, 0.0, 0.0, 0.0, 0, stage, f"{type(err).__name__}: {err}", round)


@dataclass
class Duel:
    a: Trial  # the default's turns, together
    b: Trial  # the challenger's
    ratios: list[float] = field(default_factory=list)  # b's rate over a's, per adjacent pair of turns

    @property
    def gain(self) -> float | None:
        return statistics.median(self.ratios) - 1.0 if self.ratios else None


def until(batches, deadline: float, at_least: int = 0):
    """``batches`` until ``deadline`` (perf_counter) and at least ``at_least`` of them; never takes a batch it
    does not hand out, and holds none (a batch kept alive holds its worker's slot)."""
    n = 0
    for b in batches:
        yield b
        n += 1
        if n >= at_least and time.perf_counter() >= deadline:
            return


def stamped(batches, stamps: list):
    """``batches``, noting (time handed out, samples) of each in ``stamps``."""
    for b in batches:
        stamps.append((time.perf_counter(), len(b[1])))
        yield b


def typical_rate(stamps: list, end: float, slice_s: float = SLICE_S) -> float:
    """The median samples/s of consecutive slices of at least ``slice_s`` (each batch's time runs from its
    hand-out to the next one's, the last to ``end``); 0.0 with fewer than 3 slices."""
    times = [t for t, _ in stamps] + [end]
    rates, t0, n = [], times[0], 0
    for (_, k), t_next in zip(stamps, times[1:]):
        n += k
        if t_next - t0 >= slice_s:
            rates.append(n / (t_next - t0))
            t0, n = t_next, 0
    return float(np.median(rates)) if len(rates) >= 3 else 0.0


def epochs(loader):
    """The loader's batches, epoch after epoch (as ``fit`` iterates it); stops if an epoch is empty."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        n, it = 0, iter(loader)
        try:
            for batch in it:
                n += 1
                yield batch
        finally:
            if hasattr(it, "close"):
                it.close()  # a pass left early: its workers or prefetch thread end now
        if n == 0:
            return


def _timed(call, seconds: float, at_least: int = 5) -> list[float]:
    """Seconds of each call of ``call``, repeated for ``seconds`` (and at least ``at_least`` times)."""
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < at_least:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def neutral_stats(spec):
    """Mean 0 and std 1 in the shape ``train_stats`` gives (one figure, or one per channel)."""
    if len(spec.shape) == 3:
        c = spec.shape[-1]
        return np.zeros(c, dtype=np.float32), np.ones(c, dtype=np.float32)
    return np.float32(0.0), np.float32(1.0)


@dataclass
class Counted:
    """What the turns or windows of one candidate added up to."""

    samples: int = 0
    seconds: float = 0.0
    wait: float = 0.0
    read: int | None = 0
    rates: list[float] = field(default_factory=list)

    def add(self, n: int, dt: float, wait: float, read: int | None, rates: list[float]) -> None:
        self.samples, self.seconds, self.wait = self.samples + n, self.seconds + dt, self.wait + wait
        self.read = None if read is None or self.read is None else self.read + read
        self.rates += rates


class Live:
    """One candidate built as the job builds it, its step ready to run on its batches (module docstring)."""

    def __init__(self, trials: "Trials", c: Candidate) -> None:
        self.c = c
        cfg = trials.config_for(c)
        self.exp, split = trials.exports[c.storage]
        self.device = trials.device
        if trials.cold:
            gc.collect()  # maps of an earlier trial's datasets closed, so their pages can go
            drop(self.exp.root, method="fadvise")
        stages.prepare(cfg)
        self.train, self.val = stages.make_loaders(cfg, self.exp, split, self.device)
        try:
            stats = neutral_stats(self.exp.spec) if cfg.transform.normalize else None
            self.model = stages.make_model(cfg, self.exp, stats).to(self.device)
            self.model.train()
            self.optimizer = build_optimizer(self.model, cfg.trainer)
            self.loss_fn = torch.nn.CrossEntropyLoss()
            self.stream = epochs(self.train)
            self.ahead = c.thread_prefetch + c.num_workers * int(cfg.loader.prefetch_factor)
        except BaseException:
            self.close()
            raise
        self.first_batch_ms = 0.0
        self.counted = Counted()

    def steps(self, batches) -> tuple[int, float]:
        _, _, n, wait = train_pass(self.model, batches, self.optimizer, self.loss_fn, self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return n, wait

    def warm_up(self, seconds: float) -> None:
        """The first batch (its latency kept) and ``seconds`` of steps, not counted."""
        t0 = time.perf_counter()
        first: list[float] = []

        def noted(batches):
            for b in batches:
                if not first:
                    first.append(time.perf_counter() - t0)
                yield b

        self.steps(until(noted(self.stream), t0 + seconds, at_least=1))
        self.first_batch_ms = 1e3 * first[0] if first else 0.0

    def settle(self, seconds: float) -> None:
        """Steps not counted: the batches prepared while this candidate waited, and ``seconds`` at least."""
        self.steps(until(self.stream, time.perf_counter() + seconds, at_least=self.ahead))

    def count(self, seconds: float, stop_by: float | None = None) -> float:
        """``seconds`` of counted steps (ending by ``stop_by``, a perf_counter time, if sooner); returns
        their rate."""
        stamps: list = []
        read0 = disk_read_bytes()
        t0 = time.perf_counter()
        end_by = t0 + seconds if stop_by is None else min(t0 + seconds, stop_by)
        n, wait = self.steps(stamped(until(self.stream, end_by, at_least=1), stamps))
        end = time.perf_counter()
        read = disk_read_bytes() - read0 if read0 is not None else None
        rate = n / (end - t0) if end > t0 else 0.0
        self.counted.add(n, end - t0, wait, read, [rate])
        self.typical = typical_rate(stamps, end)
        return rate

    def trial(self, stage: str, round: int, typical: float | None = None) -> Trial:
        k = self.counted
        delivered = k.samples * self.exp.stored_sample_bytes
        return Trial(
            candidate=self.c,
            samples_per_s=k.samples / k.seconds if k.seconds > 0 else 0.0,
            data_wait=k.wait / k.seconds if k.seconds > 0 else 0.0,
            read_amplification=k.read / delivered if k.read is not None and delivered else None,
            read_mb=(k.read or 0) / 1e6,
            first_batch_ms=self.first_batch_ms,
            memory_mb=snapshot().used_mb,
            seconds=k.seconds,
            samples=k.samples,
            stage=stage,
            round=round,
            typical_samples_per_s=typical if typical is not None else 0.0,
        )

    def close(self) -> None:
        stream = getattr(self, "stream", None)
        if stream is not None:
            stream.close()
        self.train.close()
        self.val.close()


class Trials:
    def __init__(self, cfg: DictConfig, device: torch.device, exports: dict, cold: bool = False) -> None:
        self.cfg, self.device, self.exports, self.cold = cfg, device, exports, cold
        self.storage_cfgs = {str(cfg.storage.name): cfg.storage}

    def storage_cfg(self, name: str):
        if name not in self.storage_cfgs:
            from pipeline.bench.schema import storage_options

            scfg = OmegaConf.create(OmegaConf.to_container(storage_options(name, self.cfg.storage)))
            if str(self.cfg.storage.get("dtype", "source")) == "uint8" and "dtype" in scfg:
                scfg.dtype = "uint8"  # the same stored values as the configured format
            self.storage_cfgs[name] = scfg
        return self.storage_cfgs[name]

    def config_for(self, c: Candidate) -> DictConfig:
        """The job's config with the candidate's settings (everything else as configured)."""
        cfg = OmegaConf.create(OmegaConf.to_container(self.cfg, resolve=False))
        cfg.storage = OmegaConf.create(OmegaConf.to_container(self.storage_cfg(c.storage)))
        if c.storage in SHARDED and c.buffers is not None:
            cfg.storage.buffers = c.buffers
        cfg.loader.num_workers = c.num_workers
        cfg.loader.decode_threads = c.decode_threads
        cfg.loader.thread_prefetch = c.thread_prefetch
        return cfg

    def serial_figures(self, c: Candidate, seconds: float = 1.0) -> tuple[float, float]:
        """(ms the loader takes a batch, ms the step takes a batch), each alone: the candidate's loader (give
        it the serial settings) iterated without training, then the step on one of its batches, over
        ``seconds`` each. Each batch is timed on its own: the loader's figure is the ``QUANTILE`` of its times
        (batches differ: decoding, buffer boundaries), the step's the fastest (every step does the same work),
        half the time with the job's intra-op threads and half with one: a neighbour on a shared machine that
        takes a core stalls every step of torch's threads for as long as it keeps it (8x here), never a single
        thread's. What the work itself costs, not the moments someone else took the cores."""
        live = Live(self, c)
        threads = torch.get_num_threads()
        try:
            batch = next(live.stream)
            next(live.stream, None)  # buffers and first reads behind
            loads = _timed(lambda: next(live.stream, None), seconds)
            live.steps([batch] * 2)  # first steps: allocations
            steps = _timed(lambda: live.steps([batch]), seconds / 2)
            torch.set_num_threads(1)
            steps += _timed(lambda: live.steps([batch]), seconds / 2)
        finally:
            torch.set_num_threads(threads)
            live.close()
        return 1e3 * float(np.quantile(loads, QUANTILE)), 1e3 * min(steps)

    def run(self, c: Candidate, seconds: float, warmup_s: float = 1.0, stop_by: float | None = None) -> Trial:
        """One window of ``c`` (cut short at ``stop_by``, a perf_counter time); an exception becomes a failed
        Trial naming it (a setting that cannot run here -- a worker killed, memory -- is never picked)."""
        live = None
        try:
            live = Live(self, c)
            live.warm_up(warmup_s)
            live.count(seconds, stop_by)
            return live.trial("trial", 0, live.typical)
        except Exception as err:
            log.warning("tune: %s failed: %s: %s", c.label(), type(err).__name__, err)
            return failed(c, err)
        finally:
            if live is not None:
                live.close()
            gc.collect()

    def duel(
        self,
        a: Candidate,
        b: Candidate,
        seconds: float,
        round: int,
        warmup_s: float = 1.0,
        turn_s: float = DUEL_SLICE_S,
        settle_s: float = SETTLE_S,
    ) -> Duel:
        """``a`` and ``b`` live at once, taking turns (``settle_s`` then ``turn_s`` counted) for ``seconds``
        in all, building included (at least two pairs of turns; module docstring)."""
        deadline = time.perf_counter() + seconds
        lives: list[Live] = []
        try:
            for c in (a, b):
                lives.append(Live(self, c))
                lives[-1].warm_up(warmup_s)
            la, lb = lives
            ratios: list[float] = []
            pair_s = 2 * (turn_s + settle_s)
            while len(ratios) < 2 or time.perf_counter() + pair_s <= deadline:
                t0 = time.perf_counter()
                rates = {}
                for live in (la, lb) if len(ratios) % 2 == 0 else (lb, la):
                    live.settle(settle_s)
                    rates[live.c] = live.count(turn_s)
                ratios.append(rates[b] / rates[a] if rates[a] > 0 else 0.0)
                pair_s = time.perf_counter() - t0
            typical = {live.c: float(np.median(live.counted.rates)) for live in lives if live.counted.rates}
            return Duel(
                la.trial("duel", round, typical.get(a)), lb.trial("duel", round, typical.get(b)), ratios
            )
        except Exception as err:
            log.warning("tune: duel %s vs %s failed: %s: %s", a.label(), b.label(), type(err).__name__, err)
            return Duel(failed(a, err, "duel", round), failed(b, err, "duel", round))
        finally:
            for live in lives:
                live.close()
            gc.collect()
