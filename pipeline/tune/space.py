"""The settings the tuner may try, and the rules that rule most of them out before any is timed.

    from pipeline.tune import space
    default = space.default_candidate(cfg, facts)
    grid = space.grid(cfg, facts, storages)           # every combination (what an exhaustive sweep runs)
    kept, pruned = space.prune(grid, facts, default)  # pruned: [(candidate, rule name, reason)]
    ordered = space.by_promise(kept, facts, default)  # the default first, then the most promising

**What may change.** Only how batches are made: the storage format (among ``tune.storages``), shards'
``storage.buffers``, ``loader.num_workers``, ``loader.decode_threads`` and ``loader.thread_prefetch``. None of
these changes a batch: epoch e's batches are a function of (seed, e) whatever the workers, threads, prefetch
or buffers (tests/test_determinism.py), so a tuned job learns exactly what the default job learns. The
format is the one exception, and only where the user lists others in ``tune.storages``: ``memmap`` shuffles
uniformly where ``shards`` shuffles by blocks. Never tried: the batch size, the seed, the model,
``shuffle_buffer_shards`` and the shard size (they change what is learned, or need a new export).

**Rules.** Each rule is a function ``rule(candidate, facts) -> reason | None`` (``RULES``), named for what
it keeps out, that prunes from facts alone (pipeline/tune/facts.py): what trials could not show in seconds
(a format that would not fit, buffers whose pages the next epoch would read again) or that a few figures
decide (loading that costs nothing to overlap, more decoding threads than cores). A rule whose fact was not
measured prunes nothing. The default candidate is never pruned: it is the baseline every trial is compared
with. After the trials, ``collapses`` keeps out any setting whose reads were amplified (out of core).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from pipeline.tune.facts import Facts

SHARDED = ("shards", "encoded")  # formats with storage.buffers
MAX_AMPLIFICATION = 1.5  # disk bytes read / bytes delivered above which a setting collapses
NEGLIGIBLE_LOAD = 0.05  # share of a serial step spent loading below which overlap cannot pay
THREAD_MIN_MS = 1.0  # a batch assembled faster than this gains nothing from being split over threads
PREFETCH = (0, 2)  # loader.thread_prefetch values tried


@dataclass(frozen=True)
class Candidate:
    storage: str
    buffers: str | None  # shards/encoded: memory | mapped (what auto resolves to); others: None
    num_workers: int
    decode_threads: int
    thread_prefetch: int

    def label(self) -> str:
        parts = [self.storage + (f" {self.buffers}" if self.buffers else "")]
        parts.append(f"{self.num_workers} workers")
        if self.decode_threads:
            parts.append(f"{self.decode_threads} threads")
        if self.thread_prefetch:
            parts.append(f"prefetch {self.thread_prefetch}")
        return ", ".join(parts)

    def settings(self) -> dict[str, object]:
        """The config keys this candidate sets, as overrides would."""
        out: dict[str, object] = {"storage": self.storage}
        if self.buffers is not None:
            out["storage.buffers"] = self.buffers
        out.update(
            {
                "loader.num_workers": self.num_workers,
                "loader.decode_threads": self.decode_threads,
                "loader.thread_prefetch": self.thread_prefetch,
            }
        )
        return out

    def overrides(self, default: "Candidate") -> list[str]:
        """Hydra overrides that turn the default's settings into this candidate's (none for the default)."""
        mine, base = self.settings(), default.settings()
        if self.storage != default.storage:  # another format: its own buffers key, if it has one
            base = {k: v for k, v in base.items() if k != "storage.buffers"}
        return [f"{k}={v}" for k, v in mine.items() if base.get(k) != v]


def buffers_of(storage_cfg, facts: Facts) -> str | None:
    """What ``storage.buffers`` resolves to for this export (pipeline/data/storage/sharded.py's rule)."""
    if str(storage_cfg.name) not in SHARDED:
        return None
    from pipeline.data.storage.sharded import buffer_mode

    return buffer_mode(storage_cfg.get("buffers", "auto"), int(facts.data.export_mb * 1e6))


def default_candidate(cfg: DictConfig, facts: Facts, resolved: dict | None = None) -> Candidate:
    """The configured settings (``auto`` values as resolved for this job: ``resolved``)."""
    loader = {**dict(cfg.loader), **(resolved or {})}
    return Candidate(
        storage=str(cfg.storage.name),
        buffers=buffers_of(cfg.storage, facts),
        num_workers=int(loader["num_workers"]),
        decode_threads=int(loader["decode_threads"]),
        thread_prefetch=int(loader["thread_prefetch"]),
    )


def counts(cores: int) -> list[int]:
    """0, 1, then powers of two up to ``cores``, and ``cores`` itself."""
    out = {0, 1, cores}
    p = 2
    while p < cores:
        out.add(p)
        p *= 2
    return sorted(out)


def grid(cfg: DictConfig, facts: Facts, storages: list[str]) -> list[Candidate]:
    """Every combination the tuner could try: for each allowed format (and its buffers), workers and decode
    threads from ``counts(job cores)`` (a thread count of 1 is 0: one thread), and ``PREFETCH``."""
    cores = facts.machine.job_cores
    workers = counts(cores)
    threads = [t for t in counts(cores) if t != 1]
    out = []
    for storage in storages:
        for buffers in ("memory", "mapped") if storage in SHARDED else (None,):
            for w in workers:
                for t in threads:
                    for p in PREFETCH:
                        out.append(Candidate(storage, buffers, w, t, p))
    return out


# ---- the rules: each returns why it keeps a candidate out, or None ----


def ram_only_when_it_fits(c: Candidate, f: Facts) -> str | None:
    if c.storage != "ram":
        return None
    need = f.data.sample_bytes * f.data.num_train / 0.8 / 2**20  # train + val, roughly
    room = f.machine.memory_room_mb
    if need > room / 2:
        return (
            f"storage=ram holds the whole split in memory, about {need:,.0f} MiB, more than half the "
            f"{room:,.0f} MiB this job may use"
        )
    return None


def no_mapped_buffers_out_of_core(c: Candidate, f: Facts) -> str | None:
    if c.buffers != "mapped" or f.data.fits_cache:
        return None
    return (
        f"the export ({f.data.export_mb:,.0f} MB) is larger than half the memory room "
        f"({f.machine.memory_room_mb:,.0f} MiB): mapped buffers leave it to the kernel's page cache, which "
        "cannot hold it, so pages read ahead are evicted before use and read again"
    )


def no_memory_buffers_when_cached(c: Candidate, f: Facts) -> str | None:
    if c.buffers != "memory" or not f.data.fits_cache:
        return None
    return (
        f"the export ({f.data.export_mb:,.0f} MB) fits the page cache: memory buffers drop the pages behind "
        "the reader, so every epoch would read it from disk again (a short trial cannot see that)"
    )


def parallel_loading_needs_load_time(c: Candidate, f: Facts) -> str | None:
    if not (c.num_workers or c.decode_threads or c.thread_prefetch) or f.load_share is None:
        return None
    if f.load_share >= NEGLIGIBLE_LOAD:
        return None
    return (
        f"loading takes {f.load_share:.0%} of a serial step ({f.load_ms:.2f} of {f.load_ms + f.step_ms:.2f} "
        f"ms): even perfect overlap saves less than {NEGLIGIBLE_LOAD:.0%}, and more processes or threads "
        "only compete with training for the cores"
    )


def threads_need_work_to_share(c: Candidate, f: Facts) -> str | None:
    if not c.decode_threads or f.load_ms is None or f.load_ms >= THREAD_MIN_MS:
        return None
    return (
        f"the serial loader assembles a batch in {f.load_ms:.2f} ms: split over threads, it would cost about "
        "as much to hand out as it saves"
    )


def workers_need_decode_or_model_work(c: Candidate, f: Facts) -> str | None:
    if not c.num_workers or f.data.per_sample_work or f.load_ms is None or f.step_ms is None:
        return None
    if f.step_ms >= f.load_ms:
        return None  # model-bound: a worker can load while the step runs
    return (
        f"nothing for a worker to take over: no per-sample decoding or augmentation, and the training step "
        f"({f.step_ms:.2f} ms) is shorter than loading a batch ({f.load_ms:.2f} ms), which is reading and "
        "copying that another process does no faster"
    )


def threads_within_cores(c: Candidate, f: Facts) -> str | None:
    cores = f.machine.job_cores
    busy = c.num_workers * max(c.decode_threads, 1) if c.num_workers else c.decode_threads
    if c.num_workers <= cores and busy <= cores:
        return None
    return f"{busy} decoding threads on {cores} cores only take turns (and with the training step)"


def parallel_needs_two_cores(c: Candidate, f: Facts) -> str | None:
    if f.machine.job_cores > 1 or not (c.num_workers or c.decode_threads):
        return None
    return "one core: workers and threads only take turns with the training step"


def one_way_to_run_ahead(c: Candidate, f: Facts) -> str | None:
    if not (c.thread_prefetch and c.num_workers):
        return None
    return (
        "workers already prepare loader.prefetch_factor batches ahead; a prefetch thread only adds a hand-off"
    )


RULES = (
    ram_only_when_it_fits,
    no_mapped_buffers_out_of_core,
    no_memory_buffers_when_cached,
    parallel_needs_two_cores,
    threads_within_cores,
    one_way_to_run_ahead,
    parallel_loading_needs_load_time,
    threads_need_work_to_share,
    workers_need_decode_or_model_work,
)


def prune(
    candidates: list[Candidate], facts: Facts, default: Candidate
) -> tuple[list[Candidate], list[tuple[Candidate, str, str]]]:
    """(kept, pruned): the default always kept (first); each other candidate pruned by the first rule of
    ``RULES`` that gives a reason, as (candidate, rule name, reason)."""
    kept, pruned = [default], []
    for c in dict.fromkeys(candidates):
        if c == default:
            continue
        for rule in RULES:
            why = rule(c, facts)
            if why:
                pruned.append((c, rule.__name__, why))
                break
        else:
            kept.append(c)
    return kept, pruned


def collapses(read_amplification: float | None) -> str | None:
    """A setting whose trial read this much more from disk than it delivered is never recommended."""
    if read_amplification is None or read_amplification <= MAX_AMPLIFICATION:
        return None
    return (
        f"read {read_amplification:.2f}x the bytes it delivered (more than {MAX_AMPLIFICATION}x): it "
        "collapses out of core"
    )


def predicted_ms(c: Candidate, f: Facts) -> float | None:
    """A rough time per batch from the serial figures, to try the promising candidates first: loading spread
    over the decoding threads, overlapped with the step when something runs ahead, and never below the
    cores' share of the total work."""
    if f.load_ms is None or f.step_ms is None:
        return None
    load, step, cores = f.load_ms, f.step_ms, f.machine.job_cores
    if c.num_workers:
        spread = c.num_workers * max(c.decode_threads, 1)
        return max(step, load / spread, (load + step) / cores)
    spread = max(c.decode_threads, 1)
    if c.thread_prefetch:
        return max(step, load / spread, (load + step) / cores)
    return load / spread + step


def by_promise(kept: list[Candidate], facts: Facts, default: Candidate) -> list[Candidate]:
    """The default first, then the others by predicted time per batch (fewest changes first on ties)."""
    others = [c for c in kept if c != default]

    def key(c: Candidate):
        p = predicted_ms(c, facts)
        return (p if p is not None else 0.0, len(c.overrides(default)))

    return [default, *sorted(others, key=key)]
