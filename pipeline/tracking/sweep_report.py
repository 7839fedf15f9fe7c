"""Sweep report: one table and two plots comparing the child runs of a multirun sweep.

    from pipeline.tracking.sweep_report import build_report, write_report
    report = build_report(tracking_uri, parent_run_id)            # reads the children from MLflow
    paths = write_report(report, out_dir)                         # CSV, markdown, PNG plots
    print(report.markdown())

``SweepCallback`` (pipeline/tracking/sweep.py) calls ``publish_report`` when a multirun ends: it writes the
files to ``<sweep dir>/report/``, logs them to the sweep's parent run under ``report/``, tags the
parent with the best configuration (``sweep.best_config``, ``sweep.best_run_id``, ...), makes the
table, best configuration on top, the parent's description (``mlflow.note.content``: the MLflow UI
shows it on the run's overview) and prints the table.

One row per child run: the overrides that differ between children, then its final-epoch
``perf/train_samples_per_s``, ``perf/epoch_seconds``, ``perf/data_wait_fraction``, ``val/accuracy``
and ``memory/peak_used_mb``. When the sweep ran several ``loader.num_workers``, a second table gives
train samples/s per storage format (``<name> uint8`` for ``storage.dtype=uint8``) and batch size
against the worker count, with the speed-up over 0 workers, and ``throughput_vs_workers.png`` plots
it. Rows are sorted best first by ``rank_by`` (metrics that measure time, loss, waiting or memory
rank lowest first; others highest first).
"""

from __future__ import annotations

import csv
import logging
import math
import shlex
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

METRICS = {
    "perf/train_samples_per_s": "train samples/s",
    "perf/epoch_seconds": "epoch s",
    "perf/data_wait_fraction": "data wait",
    "val/accuracy": "val acc",
    "memory/peak_used_mb": "peak MB",
}
AXES = {"batch_size": "loader.batch_size", "num_workers": "loader.num_workers", "storage": "storage.name"}
LOWER_IS_BETTER = ("seconds", "loss", "wait", "memory/", "_mb")
CSV_NAME, MD_NAME = "sweep_report.csv", "sweep_report.md"
NOTE_TAG, NOTE_MAX = "mlflow.note.content", 8000  # MLflow's longest tag value
THROUGHPUT_PNG, MEMORY_PNG = "throughput_vs_batch_size.png", "peak_memory_vs_workers.png"
WORKERS_PNG = "throughput_vs_workers.png"
THROUGHPUT = "perf/train_samples_per_s"


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


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
    def best(self) -> Row | None:
        ok = [r for r in self.rows if r.status == "FINISHED" and not math.isnan(r.value(self.rank_by))]
        return ok[0] if ok else None  # rows are sorted best first

    def header(self) -> list[str]:
        return ["run", "status", *self.swept, *METRICS.values()]

    def records(self) -> list[list[str]]:
        out = []
        for r in self.rows:
            cells = [r.run_name, r.status, *(r.overrides.get(k, "") for k in self.swept)]
            cells += [_fmt(m, r.value(m)) for m in METRICS]
            out.append(cells)
        return out

    def worker_scaling(self) -> list[str]:
        """A markdown table of train samples/s per storage and batch size (rows) and num_workers
        (columns), each against 0 workers; nothing unless the sweep ran more than one worker count."""
        cells: dict = defaultdict(lambda: defaultdict(list))
        for r in self.rows:
            v, w = r.value(THROUGHPUT), _num(r.axes.get("num_workers", ""))
            if r.status == "FINISHED" and not math.isnan(v) and not math.isnan(w):
                cells[(r.axes.get("storage", ""), r.axes.get("batch_size", ""))][int(w)].append(v)
        workers = sorted({w for by_w in cells.values() for w in by_w})
        if len(workers) < 2:
            return []
        lines = [
            "Train samples/s by DataLoader workers (mean of the runs at a point; x: against 0 workers):",
            "",
            "| storage | batch size | " + " | ".join(f"{w} workers" for w in workers) + " |",
            "|" + "---|" * (2 + len(workers)),
        ]
        for (storage, bs), by_w in sorted(cells.items(), key=lambda kv: (kv[0][0], _num(kv[0][1]))):
            mean = {w: sum(v) / len(v) for w, v in by_w.items()}
            base = mean.get(0)
            row = []
            for w in workers:
                if w not in mean:
                    row.append("")
                elif base and w != 0:
                    row.append(f"{mean[w]:,.0f} ({mean[w] / base:.2f}x)")
                else:
                    row.append(f"{mean[w]:,.0f}")
            lines.append(f"| {storage} | {bs} | " + " | ".join(row) + " |")
        return [*lines, ""]

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
            f"Best by {self.rank_by} ({'lowest' if lower_is_better(self.rank_by) else 'highest'}): "
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
            how = "lowest" if lower_is_better(self.rank_by) else "highest"
            distinct = len({r.run_name for r in self.rows}) == len(self.rows)
            name = best.run_name if distinct else best_config(best) or "(defaults)"
            head = [f"**Best** ({how} `{self.rank_by}`): **{name}** = {best.value(self.rank_by):.4g}", ""]
        rows = len(self.rows)
        while True:
            text = "\n".join([*head, *self.table(rows)]) + "\n"
            if len(text) <= limit or rows == 0:
                return text[:limit]
            rows -= 1


def _fmt(metric: str, value: float) -> str:
    if math.isnan(value):
        return ""
    if metric in ("perf/data_wait_fraction", "val/accuracy"):
        return f"{value:.3f}"
    if metric == "perf/epoch_seconds":
        return f"{value:.3f}"
    return f"{value:.0f}"


def best_config(row: Row) -> str:
    return " ".join(f"{k}={v}" for k, v in row.overrides.items())


def build_report(uri: str, parent_run_id: str, rank_by: str = "perf/train_samples_per_s") -> Report:
    """Read every child run of ``parent_run_id`` from the MLflow store at ``uri``."""
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
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r.overrides if k not in keys]
    swept = [k for k in keys if len({r.overrides.get(k) for r in rows}) > 1]
    for r in rows:  # only what differs between children identifies a configuration
        r.overrides = {k: v for k, v in r.overrides.items() if k in swept}
    sign = 1.0 if lower_is_better(rank_by) else -1.0

    def key(r: Row):
        v = r.value(rank_by)
        return (r.status != "FINISHED", math.isnan(v), sign * v if not math.isnan(v) else 0.0)

    return Report(parent_run_id, rank_by, sorted(rows, key=key), swept)


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
    axes[0][0].set_ylabel(METRICS.get(metric, metric))
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
        writer.writerow(["run_id", "run", "status", *report.swept, *METRICS])
        for r in report.rows:
            writer.writerow(
                [r.run_id, r.run_name, r.status, *(r.overrides.get(k, "") for k in report.swept)]
                + [("" if math.isnan(r.value(m)) else repr(r.value(m))) for m in METRICS]
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
