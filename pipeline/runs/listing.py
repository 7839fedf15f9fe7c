"""The recent runs of the MLflow store as a table in the terminal (no torch imported).

    python -m pipeline.runs                      # or: pipeline-runs; the 20 newest runs
    python -m pipeline.runs --sweep latest       # one sweep: its parent, then its children
    python -m pipeline.runs --sweep 3f2a9c       # a sweep by its parent run id (or a unique prefix)
    python -m pipeline.runs --failed             # FAILED and KILLED runs with their error tag
    python -m pipeline.runs -n 50 --experiment pipeline --tracking-uri sqlite:////abs/outputs/mlflow.db
    python -m pipeline.runs --reap               # first end the runs dead processes left RUNNING

The store is the jobs' own: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the project's SQLite
store under ``outputs/``. Columns: status, run name (a sweep's children indented under it), the
overrides that differ between the listed jobs (a sweep: what it varies), the last epoch's validation
accuracy, train samples/s, data-wait share and the run's peak memory, the duration and the start
time, and the run id's first 8 characters (``COLUMNS``; their labels and formats are the metric
registry's, pipeline/metrics.py). A RUNNING run whose process is dead (judged as the reaper,
pipeline/tracking/reaper.py, would) is shown ``RUNNING†``, with the reason under the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pipeline import metrics as registry

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROLE, PARENT, ERROR = "pipeline.role", "mlflow.parentRunId", "error"
COLUMNS = ("val/accuracy", "perf/train_samples_per_s", "perf/data_wait_fraction", "memory/peak_used_mb")
OVERRIDES_WIDTH, ERROR_WIDTH = 48, 110
DEAD_MARK = "†"


def _labels() -> list[str]:
    return [registry.get(key).label for key in COLUMNS]


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def duration(secs: float) -> str:
    if secs < 60:
        return f"{secs:.1f} s"
    secs = int(secs)
    if secs < 3600:
        return f"{secs // 60}m{secs % 60:02d}s"
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m"


def _overrides(run) -> dict[str, str]:
    from pipeline.tracking.sweep_report import parse_overrides

    return parse_overrides(run.data.tags.get("hydra.overrides", ""))


def differing_keys(runs) -> list[str]:
    """Override keys whose value is not the same in every listed job (absent counts as a value)."""
    per_run = [_overrides(r) for r in runs if r.data.tags.get(ROLE) != "sweep"]
    keys: list[str] = []
    for o in per_run:
        keys += [k for k in o if k not in keys]
    return [k for k in keys if len({o.get(k) for o in per_run}) > 1]


def ordered(runs) -> list[tuple[object, int]]:
    """(run, depth): newest first, each sweep's listed children right under it, oldest first."""
    ids = {r.info.run_id for r in runs}
    children: dict[str, list] = {}
    for r in runs:
        parent = r.data.tags.get(PARENT)
        if parent in ids:
            children.setdefault(parent, []).append(r)
    out = []
    for r in sorted(runs, key=lambda r: -(r.info.start_time or 0)):
        if r.data.tags.get(PARENT) in ids:
            continue
        out.append((r, 0))
        out += [(c, 1) for c in sorted(children.get(r.info.run_id, []), key=lambda c: c.info.start_time or 0)]
    return out


def rows(
    runs, failed: bool = False, now: float | None = None
) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, notes) of the table for ``runs``."""
    from pipeline.config.schema import TrackingConfig
    from pipeline.tracking.reaper import verdict

    now = time.time() if now is None else now
    keys = differing_keys(runs)
    header = ["status", "run", "overrides", *_labels(), "duration", "started", "id"]
    if failed:
        header.append("error")
    table, notes = [], []
    for run, depth in ordered(runs):
        info, tags, metrics = run.info, run.data.tags, run.data.metrics
        status = info.status
        if status == "RUNNING":
            why = verdict(run, stale_after_s=TrackingConfig.stale_after_s)
            if why:
                status += DEAD_MARK
                notes.append(f"{DEAD_MARK} {info.run_id[:8]}: {why}")
        if tags.get(ROLE) == "sweep":
            varied = tags.get("sweep.varied", "").split()
            mine = _overrides(run)
            over = " ".join(f"{k}={mine[k]}" for k in varied if k in mine) or tags.get("hydra.overrides", "")
        else:
            mine = _overrides(run)
            over = " ".join(f"{k}={mine[k]}" for k in keys if k in mine)
        end = info.end_time / 1000 if info.end_time else now
        cells = [
            status,
            "  " * depth + (info.run_name or info.run_id[:8]),
            _cut(over, OVERRIDES_WIDTH),
            *(registry.get(key).format(metrics.get(key)) for key in COLUMNS),
            duration(max(0.0, end - info.start_time / 1000)) + ("+" if not info.end_time else ""),
            time.strftime("%m-%d %H:%M:%S", time.localtime(info.start_time / 1000)),
            info.run_id[:8],
        ]
        if failed:
            cells.append(
                _cut((tags.get(ERROR) or "").strip().splitlines()[0] if tags.get(ERROR) else "", ERROR_WIDTH)
            )
        table.append(cells)
    return header, table, notes


def render(header: list[str], table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    numeric = set(_labels())
    lines = []
    for cells in [header, *table]:
        parts = [c.rjust(w) if h in numeric else c.ljust(w) for c, w, h in zip(cells, widths, header)]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _sweep_parent(client, experiment_id: str, which: str):
    role = f"tags.`{ROLE}` = 'sweep'"
    if which == "latest":
        found = client.search_runs(
            [experiment_id], role, max_results=1, order_by=["attributes.start_time DESC"]
        )
        if not found:
            raise LookupError("no sweep in this experiment")
        return found[0]
    if len(which) == 32:
        return client.get_run(which)
    found = [
        r
        for r in client.search_runs([experiment_id], role, max_results=5000)
        if r.info.run_id.startswith(which)
    ]
    if len(found) != 1:
        raise LookupError(f"--sweep {which}: {len(found)} sweeps have an id starting so; give more of it")
    return found[0]


def select(client, experiment_id: str, sweep: str | None, failed: bool, limit: int) -> list:
    if sweep:
        parent = _sweep_parent(client, experiment_id, sweep)
        children = client.search_runs(
            [experiment_id], f"tags.`{PARENT}` = '{parent.info.run_id}'", max_results=10_000
        )
        runs = [parent, *children]
        return [r for r in runs if r.info.status in ("FAILED", "KILLED")] if failed else runs
    # MLflow's search compares statuses one at a time (IN takes run ids only)
    where = "attributes.status != 'FINISHED' AND attributes.status != 'RUNNING'" if failed else ""
    return list(
        client.search_runs([experiment_id], where, max_results=limit, order_by=["attributes.start_time DESC"])
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.runs", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sweep", metavar="ID|latest", help="one sweep: its parent run id (or prefix), or latest"
    )
    parser.add_argument(
        "--failed", action="store_true", help="only FAILED and KILLED runs, with their error tag"
    )
    parser.add_argument("-n", "--limit", type=int, default=20, help="how many recent runs (default 20)")
    parser.add_argument("--experiment", help="default: the jobs' (tracking.experiment)")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else this project's store")
    parser.add_argument("--reap", action="store_true", help="first end the runs dead processes left RUNNING")
    args = parser.parse_args(argv)

    from pipeline.runs.reproduce import default_tracking

    uri, experiment = args.tracking_uri, args.experiment
    if not uri or not experiment:
        default_uri, default_experiment = default_tracking()
        uri, experiment = uri or default_uri, experiment or default_experiment
    from pipeline.tracking.store import client_for

    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        print(f"runs: no experiment {experiment!r} in {uri}; experiments there: {names}", file=sys.stderr)
        return 2
    if args.reap:
        from pipeline.config.schema import TrackingConfig
        from pipeline.tracking.reaper import reap

        for run_id, reason in reap(uri, exp.experiment_id, TrackingConfig.stale_after_s):
            print(f"ended {run_id} KILLED: {reason}")
    try:
        runs = select(client, exp.experiment_id, args.sweep, args.failed, args.limit)
    except LookupError as err:
        print(f"runs: {err}", file=sys.stderr)
        return 2
    what = (
        f"sweep {args.sweep}" if args.sweep else f"{len(runs)} most recent" if not args.failed else "failed"
    )
    print(f"{uri} -- experiment {experiment!r} -- {what} runs")
    if not runs:
        print("(none)")
        return 0
    header, table, notes = rows(runs, failed=args.failed)
    print(render(header, table))
    for note in notes:
        print(note)
    if notes:
        print(f"({DEAD_MARK}: its process is dead; the next job ends it KILLED, or run with --reap)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
