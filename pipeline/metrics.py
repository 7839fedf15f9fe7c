"""The metrics a job logs, defined once: name, short label, how a value prints, which way is better.

    from pipeline import metrics
    m = metrics.get("io/read_amplification")      # KeyError (UnknownMetric) for a name not defined here
    m.label, m.format(1.37), m.direction, m.unit  # "read amp", "1.37", Direction.LOWER, "x"
    metrics.find("val/acc")                       # None: never guessed from parts of the name
    metrics.rankable("train/samples_seen")        # ValueError: a counter has no better or worse
    metrics.OBJECTIVES                            # what ``objective=`` may name (pipeline/config/validate.py)
    python -m pipeline.metrics                    # the table docs/tracking.md shows

Every consumer reads from here: the sweep report (pipeline/tracking/sweep_report.py: columns, ranking),
the runs table (pipeline/runs/listing.py), the config check of ``objective`` and a tuner. A metric the
job logs but this module does not define is a defect that tests/test_metrics.py catches by running a
real job; a name asked for here that is not defined fails, naming the defined ones.

Each metric says when it is logged (``Logged``): every epoch by pipeline/training/train.py (the dict a
job returns, so the only ones a Hydra sweeper can optimise), once at the end of the run (the memory
peaks, pipeline/tracking/memory_record.py), as a sampled series (``memory/<figure>``, step = sample
index), or once per export. Entries with ``planned`` are reserved for what a named issue adds; they are
not an ``objective`` until the job logs them. The memory figures are families generated from one table
(``MEMORY_FIGURES``, the fields of pipeline.system.memory.Snapshot): ``memory/<figure>`` (series),
``memory/peak_<figure>`` and ``memory/epoch_peak_<figure>`` for the figures whose maximum means
something (``PEAK_FIGURES``); each generated name is an ordinary entry, looked up exactly.

Units: ``MB`` of I/O and export figures are 10^6 bytes; the memory figures' ``MB`` are MiB (2^20
bytes), as pipeline.system.memory measures them. This module imports nothing but the standard library:
``pipeline-runs`` and the config check import it without torch or MLflow.
"""

from __future__ import annotations

import difflib
import math
import sys
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType


class Direction(str, Enum):
    LOWER = "lower"  # lower is better
    HIGHER = "higher"  # higher is better
    NONE = "none"  # neither: a counter, a setting or a descriptive rate


class Logged(str, Enum):
    EPOCH = "epoch"  # each epoch, by train.fit; in the dict the job returns
    END = "end"  # once, at the end of the run
    SERIES = "series"  # sampled during the run
    EXPORT = "export"  # once per export


@dataclass(frozen=True)
class Metric:
    name: str
    label: str  # short, for table headers and plot axes
    fmt: str  # format spec: format(value, fmt)
    direction: Direction
    unit: str
    description: str
    logged: Logged = Logged.EPOCH
    planned: str = ""  # the issue that will log it; empty once logged

    def format(self, value: float | None) -> str:
        """The value as tables print it; "" for a missing value (None or NaN)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return format(value, self.fmt)

    @property
    def lower_is_better(self) -> bool:
        if self.direction is Direction.NONE:
            raise ValueError(f"metric {self.name!r} has no direction: no value of it is better")
        return self.direction is Direction.LOWER

    def sort_key(self, value: float) -> float:
        """Ascending order of the keys = best first."""
        return value if self.lower_is_better else -value


class UnknownMetric(KeyError, ValueError):
    """A metric name this module does not define; the message names close and valid ones."""

    def __init__(self, name: str, valid: list[str] | tuple[str, ...]):
        self.name, self.valid = name, tuple(valid)
        close = difflib.get_close_matches(name, self.valid, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        self.message = f"unknown metric {name!r}{hint}; valid (pipeline/metrics.py): {', '.join(self.valid)}"
        super().__init__(self.message)  # in repr() too, which Hydra's instantiate errors show

    def __str__(self) -> str:
        return self.message


L, H, N = Direction.LOWER, Direction.HIGHER, Direction.NONE

_DEFINED: list[Metric] = [
    # ---- every epoch, pipeline/training/train.py ----
    Metric("train/loss", "train loss", ".4f", L, "nats", "mean cross-entropy over the epoch's train samples"),
    Metric("train/accuracy", "train acc", ".3f", H, "fraction", "share of the epoch's train samples right"),
    Metric("val/loss", "val loss", ".4f", L, "nats", "mean cross-entropy over the validation split"),
    Metric("val/accuracy", "val acc", ".3f", H, "fraction", "share of the validation split right"),
    Metric(
        "train/samples_seen",
        "samples seen",
        ".0f",
        N,
        "samples",
        "train samples trained on so far, all ranks, carried over on resume",
    ),
    Metric("perf/epoch_seconds", "epoch s", ".3f", L, "s", "wall time of the epoch's train pass"),
    Metric(
        "perf/train_samples_per_s",
        "samples/s",
        ".0f",
        H,
        "samples/s",
        "train samples of the pass (all ranks) / its seconds",
    ),
    Metric(
        "perf/data_wait_fraction",
        "data wait",
        ".0%",
        L,
        "fraction",
        "share of the train pass spent waiting for the next batch",
    ),
    Metric(
        "perf/data_wait_seconds", "wait s", ".3f", L, "s", "seconds of the train pass spent waiting for data"
    ),
    Metric(
        "perf/compute_seconds", "compute s", ".3f", L, "s", "train pass seconds not spent waiting for data"
    ),
    Metric("perf/val_seconds", "val s", ".3f", L, "s", "wall time of the validation pass"),
    Metric(
        "io/read_mb",
        "read MB",
        ".1f",
        L,
        "MB (10^6 B)",
        "bytes the train pass fetched from block devices (main process + workers; ~0 from page cache)",
    ),
    Metric(
        "io/read_mb_per_s",
        "read MB/s",
        ".1f",
        N,
        "MB/s (10^6 B)",
        "io/read_mb / the train pass's seconds: a rate of a cost, neither better higher nor lower",
    ),
    Metric(
        "io/read_amplification",
        "read amp",
        ".2f",
        L,
        "x",
        "disk bytes read / (samples trained on x stored sample bytes): ~1 cold, >>1 with wasted readahead",
    ),
    # ---- reserved: issue 19, data in object storage ----
    Metric(
        "io/remote_mb",
        "remote MB",
        ".1f",
        L,
        "MB (10^6 B)",
        "bytes the train pass fetched from the object store",
        planned="issue 19",
    ),
    Metric(
        "io/remote_mb_per_s",
        "remote MB/s",
        ".1f",
        N,
        "MB/s (10^6 B)",
        "io/remote_mb / the train pass's seconds",
        planned="issue 19",
    ),
    Metric(
        "io/cache_hit_fraction",
        "cache hits",
        ".0%",
        H,
        "fraction",
        "share of the shards the train pass read from the local cache, not the object store",
        planned="issue 19",
    ),
    # ---- once per export a job built: pipeline/tracking/recorder.py, from the manifest ----
    Metric(
        "export/samples_per_s",
        "export samples/s",
        ".0f",
        H,
        "samples/s",
        "samples exported / the export's seconds",
        Logged.EXPORT,
    ),
    Metric(
        "export/mb_per_s",
        "export MB/s",
        ".1f",
        H,
        "MB/s (10^6 B)",
        "bytes the export wrote / its seconds",
        Logged.EXPORT,
    ),
    Metric(
        "export/workers",
        "export workers",
        ".0f",
        N,
        "processes",
        "worker processes the export ran (export.workers resolved)",
        Logged.EXPORT,
    ),
    # ---- end of the run, pipeline/tracking/memory_record.py (named apart from their families) ----
    Metric(
        "memory/peak_used_mb",
        "peak MB",
        ".0f",
        L,
        "MiB",
        "highest memory/used_mb sampled in the run: the memory the job held",
        Logged.END,
    ),
    Metric(
        "memory/min_system_available_mb",
        "min avail MB",
        ".0f",
        H,
        "MiB",
        "lowest MemAvailable of the machine sampled in the run",
        Logged.END,
    ),
    Metric(
        "memory/peak_cuda_max_allocated_mb",
        "CUDA max MB",
        ".0f",
        L,
        "MiB",
        "torch.cuda.max_memory_allocated at the end (CUDA devices only)",
        Logged.END,
    ),
]

# figure -> (label, unit, description): the fields of pipeline.system.memory.Snapshot but its time
MEMORY_FIGURES = {
    "used_mb": (
        "used MB",
        "MiB",
        "PSS anon + shmem of the main process and its children: what the job holds",
    ),
    "mapped_file_mb": ("mapped MB", "MiB", "PSS of mapped file pages: page cache the kernel can reclaim"),
    "rss_main_mb": ("main RSS MB", "MiB", "resident set of the main process"),
    "used_main_mb": ("main MB", "MiB", "used_mb of the main process"),
    "used_workers_mb": ("workers MB", "MiB", "used_mb of the child processes (DataLoader workers)"),
    "uss_main_mb": ("main USS MB", "MiB", "private pages of the main process: what it frees on exit"),
    "uss_workers_mb": ("workers USS MB", "MiB", "private pages of the workers (the copy-on-read guard)"),
    "workers": ("workers", "processes", "child processes alive at the sample"),
    "system_available_mb": ("avail MB", "MiB", "MemAvailable of the machine"),
    "system_used_mb": ("system MB", "MiB", "MemTotal - MemAvailable of the machine (what free shows used)"),
    "cuda_allocated_mb": ("CUDA MB", "MiB", "torch.cuda.memory_allocated (CUDA devices only)"),
    "cuda_reserved_mb": ("CUDA reserved MB", "MiB", "torch.cuda.memory_reserved (CUDA devices only)"),
}
# figures whose maximum is meaningful (pipeline.system.memory keeps the peaks of these)
PEAK_FIGURES = (
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


@dataclass(frozen=True)
class Family:
    """``template`` with ``{figure}`` for each of ``figures``: one generated Metric per figure."""

    template: str
    label: str  # with {label}: the figure's own label
    direction: Direction
    logged: Logged
    description: str  # with {description}
    figures: tuple[str, ...]


FAMILIES = (
    Family(
        "memory/{figure}",
        "{label}",
        N,
        Logged.SERIES,
        "sampled every trainer.memory_interval_s (step = sample index): {description}",
        tuple(MEMORY_FIGURES),
    ),
    Family(
        "memory/peak_{figure}", "peak {label}", L, Logged.END, "run's peak of {description}", PEAK_FIGURES
    ),
    Family(
        "memory/epoch_peak_{figure}",
        "epoch peak {label}",
        L,
        Logged.EPOCH,
        "epoch's peak of {description}",
        PEAK_FIGURES,
    ),
)


def _build() -> dict[str, Metric]:
    table: dict[str, Metric] = {}
    for m in _DEFINED:
        if m.name in table:
            raise AssertionError(f"metric {m.name} defined twice")
        table[m.name] = m
    for fam in FAMILIES:
        for fig in fam.figures:
            label, unit, desc = MEMORY_FIGURES[fig]
            name = fam.template.format(figure=fig)
            table.setdefault(  # a name defined on its own (memory/peak_used_mb) keeps its entry
                name,
                Metric(
                    name,
                    fam.label.format(label=label),
                    ".0f",
                    fam.direction,
                    unit,
                    fam.description.format(description=desc),
                    fam.logged,
                ),
            )
    return table


METRICS = MappingProxyType(_build())
RANKABLE = tuple(name for name, m in METRICS.items() if m.direction is not Direction.NONE)
# what a job may return to a Hydra sweeper (``objective=``): logged every epoch, with a direction
OBJECTIVES = tuple(
    name for name in RANKABLE if METRICS[name].logged is Logged.EPOCH and not METRICS[name].planned
)


def find(name: str) -> Metric | None:
    """The metric called exactly ``name``, or None."""
    return METRICS.get(name)


def get(name: str) -> Metric:
    """The metric called exactly ``name``; UnknownMetric (a KeyError) naming the defined ones if none."""
    m = METRICS.get(name)
    if m is None:
        raise UnknownMetric(name, list(METRICS))
    return m


def rankable(name: str) -> Metric:
    """The metric ``name`` if runs can be ranked by it; else a ValueError naming those that can."""
    m = METRICS.get(name)
    if m is None:
        raise UnknownMetric(name, RANKABLE)
    if m.direction is Direction.NONE:
        raise ValueError(
            f"metric {name!r} has no direction (no value of it is better), so nothing can be ranked by it;"
            f" rank by one of: {', '.join(RANKABLE)}"
        )
    return m


def markdown() -> str:
    """The table of every metric (families as one row each), as docs/tracking.md shows it."""
    lines = ["| metric | label | unit | better | logged | meaning |", "|---|---|---|---|---|---|"]
    own = {m.name for m in _DEFINED}
    for m in METRICS.values():
        if m.name not in own:  # generated: its family's row below
            continue
        logged = m.logged.value + (f" ({m.planned})" if m.planned else "")
        lines.append(
            f"| `{m.name}` | {m.label} | {m.unit} | {m.direction.value} | {logged} | {m.description} |"
        )
    for fam in FAMILIES:
        figures = ", ".join(f"`{f}`" for f in fam.figures)
        units = " or ".join(dict.fromkeys(MEMORY_FIGURES[f][1] for f in fam.figures))
        name, label = fam.template.replace("{figure}", "<figure>"), fam.label.replace("{label}", "<label>")
        what = fam.description.replace("{description}", "<figure>")
        lines.append(
            f"| `{name}` | {label} | {units} | {fam.direction.value} | {fam.logged.value} | {what};"
            f" <figure>: {figures} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
