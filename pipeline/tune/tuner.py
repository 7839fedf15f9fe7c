"""The tune: facts, candidates, trials within the budget, and an answer checked against the default.

    from pipeline.tune.tuner import tune
    answer = tune(cfg, user_overrides=["storage=encoded", "transform=flip_crop"])
    answer.chosen, answer.overrides, answer.command, answer.gain, answer.trials, answer.pruned

Steps (the budget, ``tune.budget_s``, counts from the end of step 1):

1. The configured export, as the job makes it (reused when it exists; not counted: the job needs it anyway)
   and the split.
2. Facts (pipeline/tune/facts.py): the machine, the data, the disk; the export read into the page cache when
   it fits there (trials then run warm, as the job's later epochs do), else each trial starts cold.
3. Exports of the other formats ``tune.storages`` allows (never one it does not list).
4. The serial loader and the training step timed alone: what the rules and the order of the trials use.
5. Screening: the candidates (pipeline/tune/space.py), pruned by the rules, the default first and then the
   most promising, one window each, sized so that every one and the confirmation fit the budget (at least
   ``MIN_WINDOW_S``; when they cannot all fit, the least promising are left untried, and the report says so).
6. **Honesty.** A setting that failed or read more than 1.5x what it delivered is out. The leaders (the
   screening's fastest, up to ``LEADERS``, faster than the default there) then each duel the default: both
   live at once, taking turns (pipeline/tune/trials.py), so that the load of a shared machine falls on both
   alike. A setting's gain is the median ratio of its rate to the default's over adjacent pairs of turns;
   the first to reach ``tune.min_gain`` is recommended. Otherwise the answer is the default, and the report
   says that nothing beat it. ``DUEL_SHARE`` of the budget is kept for the duels.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from omegaconf import DictConfig

from pipeline import stages
from pipeline.tune import facts as facts_
from pipeline.tune import space
from pipeline.tune.schema import allowed_storages
from pipeline.tune.trials import DUEL_SLICE_S, SETTLE_S, Duel, Trial, Trials

log = logging.getLogger(__name__)

MIN_WINDOW_S = 1.0  # a screening window, at least
MAX_WINDOW_S = 5.0
WARMUP_S = 0.5
LEADERS = 2  # challengers that may duel the default
DUEL_SHARE = 0.35  # of the budget kept for the duels
DUEL_TURN_S = DUEL_SLICE_S + SETTLE_S
DUEL_MIN_S = 4 * DUEL_TURN_S + 2 * WARMUP_S + 1.0  # two pairs of turns, two builds and warm-ups


def report_reserve_s(budget_s: float) -> float:
    """Left at the end of the budget for the answer (files, the MLflow runs: 1-3 s) and for a last build or
    close that a busy machine made slower than the ones before."""
    return min(5.0, max(2.5, budget_s / 10))


def serial_s(budget_s: float) -> float:
    """How long the serial loader and the step are each timed alone."""
    return min(1.0, budget_s / 40)


@dataclass
class Answer:
    facts: facts_.Facts
    default: space.Candidate
    chosen: space.Candidate
    trials: list[Trial]
    pruned: list[tuple[space.Candidate, str, str]]
    untried: list[space.Candidate]
    disqualified: dict[space.Candidate, str]
    best: space.Candidate | None  # the fastest other setting in the trials, confirmed or not
    gain: float | None  # median of the best's windows / the default's, minus 1
    user_overrides: list[str]
    budget_s: float
    seconds: float  # measuring and trials, against the budget
    export_seconds: float  # exports made first (not counted)
    exports: dict = field(default_factory=dict)  # storage -> export fingerprint
    min_gain: float = 0.05
    ratios: list[float] = field(default_factory=list)  # the best's rate over the default's, per pair of turns
    duels: list = field(default_factory=list)  # (challenger, Duel), in the order fought

    @property
    def overrides(self) -> list[str]:
        """The tuned overrides: the chosen settings that differ from the configured ones."""
        return self.chosen.overrides(self.default)

    @property
    def beat_default(self) -> bool:
        return self.chosen != self.default

    @property
    def command(self) -> str:
        tuned = self.overrides
        keys = {o.split("=", 1)[0] for o in tuned}
        kept = [o for o in self.user_overrides if o.lstrip("+~").split("=", 1)[0] not in keys]
        return " ".join(["pipeline", *kept, *tuned])


def user_overrides_from_hydra() -> list[str]:
    """The command line's overrides (tune.* and hydra.* left out: they are not the job's)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(("tune.", "hydra."))]


def tune(cfg: DictConfig, user_overrides: list[str] | None = None, device=None) -> Answer:
    from pipeline.training.train import resolve_device
    from pipeline.tune.auto import resolve

    device = device or resolve_device(cfg.trainer.device)
    overrides = user_overrides if user_overrides is not None else user_overrides_from_hydra()
    t_export = time.perf_counter()
    exp = stages.export_data(cfg)
    split = stages.split_data(cfg, exp)
    export_s = time.perf_counter() - t_export
    start = time.perf_counter()
    deadline = start + float(cfg.tune.budget_s)

    f = facts_.Facts(facts_.machine(facts_.device_name(device)), facts_.data(cfg, exp, split))
    f.batch_size = int(cfg.loader.batch_size)
    f.load_average = (facts_.load_average(), None)
    _, resolved = resolve(cfg, exp, device)
    default = space.default_candidate(
        cfg, f, {k.rsplit(".", 1)[1]: v for k, v in resolved.items() if k != "loader.resolved.from"}
    )
    exports = {default.storage: (exp, split)}
    for name in allowed_storages(cfg):  # only what tune.storages allows
        if name not in exports and time.perf_counter() < deadline:
            exports[name] = _export_other(cfg, name)
    f.disk = facts_.disk(exp)
    cold = not f.data.fits_cache
    if not cold:
        for e, _ in exports.values():
            facts_.warm(e.root)
    trials = Trials(cfg, device, exports, cold=cold)
    serial = space.Candidate(default.storage, default.buffers, 0, 0, 0)
    f.load_ms, f.step_ms = trials.serial_figures(serial, serial_s(float(cfg.tune.budget_s)))
    log.info("tune: facts\n%s", "\n".join(f"  {a}: {b} ({c})" for a, b, c in f.rows()))

    grid = space.grid(cfg, f, list(exports))
    kept, pruned = space.prune(grid, f, default)
    ordered = space.by_promise(kept, f, default)
    log.info(
        "tune: %d settings, %d pruned by the rules, %d to try",
        len(set(grid) | {default}),
        len(pruned),
        len(ordered),
    )
    run = _Runner(trials, deadline, default, float(cfg.tune.budget_s))
    untried = run.screen(ordered)
    if untried and not run.leaders():  # nothing to duel yet: the duels' reserve goes to the rest
        untried = run.screen(untried, keep_for_duels=False)
    best, duel = run.duel_all(float(cfg.tune.min_gain))
    if best is None:  # nothing confirmed: the screening's leader, for the report
        leaders = run.leaders()
        best = leaders[0] if leaders else None
    gain = duel.gain if duel is not None else None
    f.load_average = (f.load_average[0], facts_.load_average())
    answer = Answer(
        facts=f,
        default=default,
        chosen=best if gain is not None and gain >= float(cfg.tune.min_gain) else default,
        trials=run.done,
        pruned=pruned,
        untried=untried,
        disqualified=run.disqualified,
        best=best,
        gain=gain,
        user_overrides=overrides,
        budget_s=float(cfg.tune.budget_s),
        seconds=0.0,
        export_seconds=export_s,
        exports={name: e.fingerprint for name, (e, _) in exports.items()},
        min_gain=float(cfg.tune.min_gain),
        ratios=duel.ratios if duel is not None else [],
        duels=run.duels,
    )
    answer.seconds = time.perf_counter() - start
    return answer


class _Runner:
    """Screening (one window each, in order of promise) and duels of the leaders against the default (see
    the module docstring and pipeline/tune/trials.py)."""

    def __init__(self, trials: Trials, deadline: float, default: space.Candidate, budget_s: float) -> None:
        self.trials, self.deadline, self.default = trials, deadline, default
        self.duel_reserve = max(DUEL_MIN_S, DUEL_SHARE * budget_s)
        self.reserve = report_reserve_s(budget_s)
        self.done: list[Trial] = []
        self.duels: list[tuple[space.Candidate, Duel]] = []
        self.disqualified: dict[space.Candidate, str] = {}
        self.overhead = 1.0  # building loaders, starting workers, the warm-up: the slowest measured

    def left(self) -> float:
        return self.deadline - time.perf_counter() - self.reserve

    def note(self, t: Trial) -> None:
        self.done.append(t)
        why = t.error or space.collapses(t.read_amplification)
        if why and t.candidate != self.default:
            self.disqualified.setdefault(t.candidate, why)

    def screen(self, ordered: list[space.Candidate], keep_for_duels: bool = True) -> list[space.Candidate]:
        """One window each, in order, sized so that all fit (beside the duels' reserve); returns those left
        untried when not even ``MIN_WINDOW_S`` fits (the least promising). The default always runs: it is
        the baseline."""
        reserve = self.duel_reserve if keep_for_duels and len(ordered) > 1 else 0.0
        for i, c in enumerate(ordered):
            room = self.left() - reserve
            window = min(MAX_WINDOW_S, room / (len(ordered) - i) - self.overhead)
            if window < MIN_WINDOW_S:
                if c != self.default and room < 2 * self.overhead + MIN_WINDOW_S:  # a busy machine's
                    return ordered[i:]  # next build and warm-up may take twice the slowest so far
                window = MIN_WINDOW_S
            t0 = time.perf_counter()
            t = self.trials.run(c, window, WARMUP_S, stop_by=self.deadline - self.reserve)
            # the slowest build and warm-up so far: a busy machine's next one may be as slow
            self.overhead = max(self.overhead, time.perf_counter() - t0 - t.seconds)
            self.note(t)
            log.info("tune: %s", describe(t))
        return []

    def leaders(self) -> list[space.Candidate]:
        """Other candidates faster than the default in the screening, fastest first (``LEADERS`` at most)."""
        base = next((t.rate for t in self.done if t.candidate == self.default and t.ok), 0.0)
        ok = [
            t
            for t in self.done
            if t.ok and t.candidate != self.default and t.candidate not in self.disqualified
        ]
        ranked = sorted(ok, key=lambda t: t.rate, reverse=True)
        return [t.candidate for t in ranked if t.rate > base][:LEADERS]

    def duel_all(self, min_gain: float) -> tuple[space.Candidate | None, Duel | None]:
        """Duels of the leaders against the default, the first leader given the reserve (or all the time
        left); the first to reach ``min_gain`` wins. Returns (the best challenger, its duel)."""
        best: tuple[space.Candidate | None, Duel | None] = (None, None)
        for i, c in enumerate(self.leaders()):
            seconds = self.left() if i == 0 else min(self.left(), self.duel_reserve)
            if seconds < DUEL_MIN_S:  # not even two pairs of turns: unconfirmed (the report says so)
                break
            duel = self.trials.duel(self.default, c, seconds, round=i + 1, warmup_s=WARMUP_S)
            self.duels.append((c, duel))
            for t in (duel.a, duel.b):
                self.note(t)
            log.info(
                "tune: duel %d, %s against the default: %s (ratios %s)",
                i + 1,
                c.label(),
                f"{duel.gain:+.0%}" if duel.gain is not None else "failed",
                ", ".join(f"{r:.2f}" for r in duel.ratios),
            )
            if duel.gain is None or c in self.disqualified:
                continue
            if best[1] is None or duel.gain > best[1].gain:
                best = (c, duel)
            if duel.gain >= min_gain:
                break
        return best


def _export_other(cfg: DictConfig, name: str):
    """An allowed format's export and split (the same source and split settings)."""
    from pipeline.data.export import export
    from pipeline.data.partition import partition

    trials = Trials(cfg, None, {})
    scfg = trials.storage_cfg(name)
    t0 = time.perf_counter()
    exp = export(cfg.source, scfg, cfg.paths.data_dir, verify=cfg.verify)
    log.info("tune: storage=%s export %s (%.1f s)", name, exp.root.name, time.perf_counter() - t0)
    return exp, partition(exp.labels, cfg.split)


def describe(t: Trial) -> str:
    if not t.ok:
        return f"{t.candidate.label()}: failed ({t.error})"
    amp = f", read amp {t.read_amplification:.2f}" if t.read_amplification is not None and t.read_mb else ""
    return (
        f"{t.candidate.label()}: {t.samples_per_s:,.0f} samples/s (typical {t.rate:,.0f}), "
        f"{t.data_wait:.0%} waiting for data"
        f"{amp}, first batch {t.first_batch_ms:.0f} ms, {t.seconds:.1f} s"
    )
