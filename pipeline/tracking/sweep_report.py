"""Sweep report: one table and two plots comparing the child runs of a multirun sweep.

    from pipeline.tracking.sweep_report import build_report, write_report
    report = build_report(tracking_uri, parent_run_id, rank_by="perf/train_samples_per_s")  # from MLflow
    paths = write_report(report, out_dir)                         # CSV, markdown, PNG plots
    print(report.markdown())

``SweepCallback`` (pipeline/tracking/sweep.py) calls ``publish_report`` when a multirun ends: it writes the
files to ``<sweep dir>/report/``, logs them to the sweep's parent run under ``report/``, tags the
parent with the best configuration (``sweep.best_config``, ``sweep.best_run_id``, ...), makes the
table, best configuration on top, the parent's description (``mlflow.note.content``: the MLflow UI
shows it on the run's overview) and prints the table.

One row per child run: the overrides that differ between children, then its final-epoch
``perf/train_samples_per_s``, ``perf/epoch_seconds``, ``perf/data_wait_fraction``, ``val/accuracy``
and ``memory/peak_used_mb`` (``COLUMNS``; ``rank_by`` is added when it is not one of them). When the
sweep ran several ``loader.num_workers``, a second table gives train samples/s per storage format
(``<name> uint8`` for ``storage.dtype=uint8``) and batch size against the worker count, with the
speed-up over 0 workers, and ``throughput_vs_workers.png`` plots it. Rows are sorted best first by
``rank_by``. Labels, formats and which way is better come from the metric registry
(pipeline/metrics.py); a ``rank_by`` it does not define, or one without a direction (a counter such as
``train/samples_seen``), is refused naming the metrics that can rank.
"""

from __future__ import annotations

import csv
import logging
import math
import shlex
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import metrics as registry

log = logging.getLogger(__name__)

COLUMNS = (
    "perf/train_samples_per_s",
    "perf/epoch_seconds",
    "perf/data_wait_fraction",
    "val/accuracy",
    "memory/peak_used_mb",
)
AXES = {
    "batch_size": "loader.batch_size",
    "num_workers": "loader.num_workers",
    "decode_threads": "loader.decode_threads",
    "storage": "storage.name",
}
WAIT = "perf/data_wait_fraction"
CSV_NAME, MD_NAME = "sweep_report.csv", "sweep_report.md"
NOTE_TAG, NOTE_MAX = "mlflow.note.content", 8000  # MLflow's longest tag value
THROUGHPUT_PNG, MEMORY_PNG = "throughput_vs_batch_size.png", "peak_memory_vs_workers.png"
WORKERS_PNG = "throughput_vs_workers.png"
THROUGHPUT = "perf/train_samples_per_s"


def parse_overrides(text: str) -> dict[str, str]:
    """``"a=1 +b=x storage=npy"`` -> ``{"a": "1", "b": "x", "storage": "npy"}`` (hydra/* ones dropped)."""
    out: dict[str, str] = {}
    for item in shlex.split(text or ""):
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if sep and not key.startswith("hydra"):
            out[key] = value
    return out


@dataclass
class Row:
    run_id: str
    run_name: str
    status: str
    overrides: dict[str, str]
    axes: dict[str, str]
    metrics: dict[str, float]

    def value(self, metric: str) -> float:
        return self.metrics.get(metric, math.nan)


@dataclass
class Report:
    parent_run_id: str
    rank_by: str
    rows: list[Row]
    swept: list[str] = field(default_factory=list)  # override keys whose value differs between rows

    @property
    def columns(self) -> tuple[str, ...]:
        """The metrics of the table: ``COLUMNS``, then ``rank_by`` when it is not one of them."""
        return COLUMNS if self.rank_by in COLUMNS else (*COLUMNS, self.rank_by)

    @property
    def how(self) -> str:
        return "lowest" if registry.rankable(self.rank_by).lower_is_better else "highest"

    @property
    def best(self) -> Row | None:
        ok = [r for r in self.rows if r.status == "FINISHED" and not math.isnan(r.value(self.rank_by))]
        return ok[0] if ok else None  # rows are sorted best first

    def header(self) -> list[str]:
        return ["run", "status", *self.swept, *(registry.get(m).label for m in self.columns)]

    def records(self) -> list[list[str]]:
        out = []
        for r in self.rows:
            cells = [r.run_name, r.status, *(r.overrides.get(k, "") for k in self.swept)]
            cells += [registry.get(m).format(r.value(m)) for m in self.columns]
            out.append(cells)
        return out

    def worker_scaling(self) -> list[str]:
        """A markdown table of train samples/s per storage and batch size (rows) and loader parallelism --
        workers x decode threads -- (columns), each against 0 workers and 1 thread, then a verdict per row:
        which setting won and why; nothing unless the sweep ran more than one parallel setting."""
        cells: dict = defaultdict(lambda: defaultdict(list))
        waits: dict = defaultdict(lambda: defaultdict(list))
        for r in self.rows:
            v, w = r.value(THROUGHPUT), _num(r.axes.get("num_workers", ""))
            t = _num(r.axes.get("decode_threads", "") or "0")
            if r.status == "FINISHED" and not math.isnan(v) and not math.isnan(w):
                key = (r.axes.get("storage", ""), r.axes.get("batch_size", ""))
                cells[key][(int(w), int(t))].append(v)
                waits[key][(int(w), int(t))].append(r.value(WAIT))
        settings = sorted({p for by_p in cells.values() for p in by_p})
        if len(settings) < 2:
            return []
        lines = [
            "Train samples/s by loader workers and decode threads (mean of the runs at a point; x: against 0 "
            "workers, 1 thread):",
            "",
            "| storage | batch size | " + " | ".join(_setting(p) for p in settings) + " |",
            "|" + "---|" * (2 + len(settings)),
        ]
        verdicts = []
        for key, by_p in sorted(cells.items(), key=lambda kv: (kv[0][0], _num(kv[0][1]))):
            mean = {p: sum(v) / len(v) for p, v in by_p.items()}
            wait = {p: _mean(v) for p, v in waits[key].items()}
            base = mean.get((0, 0))
            row = []
            for p in settings:
                if p not in mean:
                    row.append("")
                elif base and p != (0, 0):
                    row.append(f"{mean[p]:,.0f} ({mean[p] / base:.2f}x)")
                else:
                    row.append(f"{mean[p]:,.0f}")
            lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(row) + " |")
            verdicts.append(_verdict(key, mean, wait))
        return [*lines, "", *verdicts, ""]

    def table(self, max_rows: int | None = None) -> list[str]:
        head = self.header()
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        records = self.records()
        lines += ["| " + " | ".join(cells) + " |" for cells in records[:max_rows]]
        if max_rows is not None and len(records) > max_rows:
            lines += ["", f"... and {len(records) - max_rows} more runs: see report/{MD_NAME}"]
        return lines

    def best_line(self) -> str:
        best = self.best
        if best is None:
            return f"No finished child run has {self.rank_by}."
        return (
            f"Best by {self.rank_by} ({self.how}): "
            f"{best_config(best) or '(defaults)'} -> {best.value(self.rank_by):.4g} (run {best.run_id})"
        )

    def markdown(self) -> str:
        return "\n".join([*self.table(), "", *self.worker_scaling(), self.best_line()]) + "\n"

    def description(self, limit: int = NOTE_MAX) -> str:
        """The parent run's description: one line naming the best configuration, then the table (rows cut
        to fit ``limit`` characters; the full report is the ``report/`` artifact). Short on top: the
        MLflow UI shows the first lines of a description until "Show more" is clicked."""
        best = self.best
        if best is None:
            head = [self.best_line(), ""]
        else:
            distinct = len({r.run_name for r in self.rows}) == len(self.rows)
            name = best.run_name if distinct else best_config(best) or "(defaults)"
            head = [
                f"**Best** ({self.how} `{self.rank_by}`): **{name}** = {best.value(self.rank_by):.4g}",
                "",
            ]
        rows = len(self.rows)
        while True:
            text = "\n".join([*head, *self.table(rows)]) + "\n"
            if len(text) <= limit or rows == 0:
                return text[:limit]
            rows -= 1


def best_config(row: Row) -> str:
    return " ".join(f"{k}={v}" for k, v in row.overrides.items())


def build_report(uri: str, parent_run_id: str, rank_by: str = "perf/train_samples_per_s") -> Report:
    """Read every child run of ``parent_run_id`` from the MLflow store at ``uri``; ``rank_by`` is checked
    against the registry first."""
    registry.rankable(rank_by)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=10_000,
    )
    rows = []
    for run in runs:
        params, tags = run.data.params, run.data.tags
        rows.append(
            Row(
                run_id=run.info.run_id,
                run_name=run.info.run_name or run.info.run_id[:8],
                status=run.info.status,
                overrides=parse_overrides(tags.get("hydra.overrides", "")),
                axes=_axes(params),
                metrics={k: float(v) for k, v in run.data.metrics.items()},
            )
        )
    return make_report(parent_run_id, rows, rank_by)


def _axes(params: dict) -> dict:
    axes = {axis: params.get(key, "") for axis, key in AXES.items()}
    if params.get("storage.dtype") == "uint8":  # 8-bit storage is another format as far as speed goes
        axes["storage"] += " uint8"
    return axes


def make_report(parent_run_id: str, rows: list[Row], rank_by: str) -> Report:
    """Rows sorted best first by ``rank_by`` (finished runs with a value first); ValueError naming the
    metrics that can rank if the registry does not define ``rank_by`` or gives it no direction."""
    metric = registry.rankable(rank_by)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r.overrides if k not in keys]
    swept = [k for k in keys if len({r.overrides.get(k) for r in rows}) > 1]
    for r in rows:  # only what differs between children identifies a configuration
        r.overrides = {k: v for k, v in r.overrides.items() if k in swept}

    def key(r: Row):
        v = r.value(rank_by)
        return (r.status != "FINISHED", math.isnan(v), metric.sort_key(v) if not math.isnan(v) else 0.0)

    return Report(parent_run_id, rank_by, sorted(rows, key=key), swept)


def _setting(p: tuple[int, int]) -> str:
    w, t = p
    return f"{w} workers" + (f", {t} threads" if t else "")


def _mean(values: list[float]) -> float:
    ok = [v for v in values if not math.isnan(v)]
    return sum(ok) / len(ok) if ok else math.nan


def _verdict(key: tuple[str, str], mean: dict, wait: dict) -> str:
    """Which parallel setting won for one storage and batch size, and why: how long the training step
    waited for data with the serial loader (the bottleneck is the data when it waited long, the model when
    it hardly waited) and with the winner."""
    storage, bs = key
    best = max(mean, key=mean.get)
    serial = (0, 0)
    decode = "decoding" if storage.startswith("encoded") else "reading"
    where = f"{storage}, batch {bs}: "
    if serial not in mean:
        return (
            f"- {where}{_setting(best)} was fastest ({mean[best]:,.0f} samples/s); no serial run to compare."
        )
    w0, gain = wait.get(serial, math.nan), mean[best] / mean[serial]
    if best == serial or gain < 1.05:
        why = (
            f"with 0 workers the step waited {w0:.0%} of the epoch for data, so the model, not the data, "
            "bounds the epoch: more processes or threads only compete with training for the cores"
            if not math.isnan(w0) and w0 < 0.15
            else f"the parallel settings did not beat it (best {_setting(best)}: {gain:.2f}x)"
        )
        return f"- {where}0 workers won ({mean[serial]:,.0f} samples/s): {why}."
    won = f"{_setting(best)} won ({mean[best]:,.0f} samples/s, {gain:.2f}x 0 workers)"
    return (
        f"- {where}{won}: with 0 workers the step waited {w0:.0%} of the epoch for data ({decode} was the "
        f"bottleneck), with {_setting(best)} {wait.get(best, math.nan):.0%}."
    )


def _num(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _plot(report: Report, path: Path, *, x: str, line: str, panel: str, metric: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # panel -> line -> x -> values (mean over children that share them, e.g. other swept keys)
    data: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in report.rows:
        v, xv = r.value(metric), _num(r.axes[x])
        if r.status == "FINISHED" and not math.isnan(v) and not math.isnan(xv):
            data[r.axes[panel]][r.axes[line]][xv].append(v)
    panels = sorted(data) or ["(no data)"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], panels):
        lines = data.get(name, {})
        for label in sorted(lines, key=lambda s: (_num(s), s)):
            xs = sorted(lines[label])
            ax.plot(xs, [sum(lines[label][v]) / len(lines[label][v]) for v in xs], marker="o", label=label)
        ax.set_title(f"{panel} = {name}")
        ax.set_xlabel(x.replace("_", " "))
        ticks = sorted({v for values in lines.values() for v in values})
        if x == "batch_size" and ticks:
            ax.set_xscale("log", base=2)
        if ticks:
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(title=line.replace("_", " "), fontsize=8)
    axes[0][0].set_ylabel(registry.get(metric).label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: Report, out_dir: str | Path) -> list[Path]:
    """Write the CSV, the markdown table and both plots into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / CSV_NAME, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["run_id", "run", "status", *report.swept, *report.columns])
        for r in report.rows:
            writer.writerow(
                [r.run_id, r.run_name, r.status, *(r.overrides.get(k, "") for k in report.swept)]
                + [("" if math.isnan(r.value(m)) else repr(r.value(m))) for m in report.columns]
            )
    (out / MD_NAME).write_text(report.markdown())
    _plot(
        report,
        out / THROUGHPUT_PNG,
        x="batch_size",
        line="num_workers",
        panel="storage",
        metric="perf/train_samples_per_s",
        title="Train throughput vs batch size",
    )
    _plot(
        report,
        out / WORKERS_PNG,
        x="num_workers",
        line="batch_size",
        panel="storage",
        metric=THROUGHPUT,
        title="Train throughput vs DataLoader workers",
    )
    _plot(
        report,
        out / MEMORY_PNG,
        x="num_workers",
        line="batch_size",
        panel="storage",
        metric="memory/peak_used_mb",
        title="Peak memory (PSS anon + shmem) vs DataLoader workers",
    )
    return [out / CSV_NAME, out / MD_NAME, out / THROUGHPUT_PNG, out / WORKERS_PNG, out / MEMORY_PNG]


def publish_report(uri: str, parent_run_id: str, out_dir: str | Path, rank_by: str) -> Report:
    """Build and write the report, log it to the parent run and tag the parent with the best config."""
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    report = build_report(uri, parent_run_id, rank_by)
    paths = write_report(report, out_dir)
    client = MlflowClient(tracking_uri=uri)
    for path in paths:
        client.log_artifact(parent_run_id, str(path), "report")
    tags = {"sweep.children": str(len(report.rows)), "sweep.rank_by": rank_by, NOTE_TAG: report.description()}
    best = report.best
    if best is not None:
        tags.update(
            {
                "sweep.best_config": best_config(best) or "(defaults)",
                "sweep.best_run_id": best.run_id,
                "sweep.best_value": f"{best.value(rank_by):.6g}",
            }
        )
    client.log_batch(parent_run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return report
