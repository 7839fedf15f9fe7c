"""Rerun a logged run from what MLflow recorded and check that it gives the same metrics.

    python -m pipeline.runs.reproduce RUN_ID                      # or: pipeline-reproduce RUN_ID
    python -m pipeline.runs.reproduce RUN_ID loader.num_workers=2 # extra overrides, applied last
    python -m pipeline.runs.reproduce RUN_ID --tracking-uri sqlite:////abs/outputs/mlflow.db --atol 1e-6

Reruns ``python -m pipeline`` in this project with the overrides of the run's ``hydra/overrides.yaml``
artifact, less those that say where a run lives (``paths.*``, ``hydra.*``, ``tracking.uri``,
``tracking.artifact_location``) and ``trainer.resume``, logging to the same store from
``<paths.outputs>/runs/reproduce-<run id>-<time>-<pid>``; tags the rerun ``pipeline.reproduces`` and
``pipeline.reproduce_result``; compares every ``train/*`` and ``val/*`` history step by step (exactly,
or within ``--atol``) and prints them, both runs' lineage and the config keys that differ.
Exit status: 0 all match, 1 a metric diverges or is missing or the rerun failed, 2 no such run or no
overrides artifact.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import yaml  # noqa: E402

from pipeline.config.resolvers import CONF_DIR as REPO_CONF  # noqa: E402
from pipeline.tracking.store import config_differences  # noqa: E402

# export.* (workers, engine, cluster address) changes how fast the export is built, never its bytes
# (test_export_workers): a rerun on another machine builds it its own way.
DROPPED_PREFIXES = ("paths.", "hydra.", "hydra/", "export.")
DROPPED_KEYS = {"tracking.uri", "tracking.artifact_location", "trainer.resume"}
COMPARED_PREFIXES = ("train/", "val/")
LINEAGE_TAGS = (
    "config.sha256",
    "data.content_sha256",
    "split.digest",
    "git.commit",
    "git.dirty",
    "version.torch",
    "version.numpy",
    "version.python",
)


class ReproduceError(RuntimeError):
    pass


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def rerun_overrides(original: list[str], extra: list[str]) -> list[str]:
    """The original overrides minus location/resume ones, then ``extra``."""
    kept = [
        o
        for o in original
        if override_key(o) not in DROPPED_KEYS and not override_key(o).startswith(DROPPED_PREFIXES)
    ]
    return kept + list(extra)


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import pipeline.config

    pipeline.config.register()

    with initialize_config_dir(config_dir=str(REPO_CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def default_tracking() -> tuple[str, str]:
    """The store and experiment a job without overrides uses: ``$MLFLOW_TRACKING_URI``, else the project's
    SQLite store under ``outputs/`` (conf/ and pipeline/config/resolvers.py decide)."""
    tracking = _compose([]).tracking
    return str(tracking.uri), str(tracking.experiment)


def default_tracking_uri() -> str:
    return default_tracking()[0]


def fetch_overrides(client, run_id: str) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="pipeline-reproduce-") as tmp:
        try:
            path = client.download_artifacts(run_id, "hydra/overrides.yaml", tmp)
        except Exception as err:
            raise ReproduceError(
                f"run {run_id} has no hydra/overrides.yaml artifact ({type(err).__name__}); only runs "
                "started with the pipeline CLI can be reproduced"
            ) from err
        overrides = yaml.safe_load(Path(path).read_text()) or []
    if not isinstance(overrides, list):
        raise ReproduceError(f"run {run_id}: hydra/overrides.yaml is not a list of overrides")
    return [str(o) for o in overrides]


def find_run_by_output_dir(client, output_dir: Path):
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`pipeline.output_dir` = '{output_dir}'")
    return runs[0] if runs else None


def history(client, run_id: str, key: str) -> dict[int, float]:
    """step -> value; a step logged twice keeps its latest value."""
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in points}


def compare(client, original, rerun, atol: float = 0.0) -> list[dict]:
    """One row per compared metric of the original run: steps, last values, max |diff|, status."""
    rows = []
    keys = sorted(k for k in original.data.metrics if k.startswith(COMPARED_PREFIXES))
    for key in keys:
        a = history(client, original.info.run_id, key)
        b = history(client, rerun.info.run_id, key) if key in rerun.data.metrics else {}
        row = {"metric": key, "steps": len(a), "original": a[max(a)], "rerun": None, "diff": None}
        if not b:
            row["status"] = "MISSING in rerun"
        elif not set(a) <= set(b):
            row["status"] = f"DIVERGED: steps {sorted(set(a) - set(b))} missing in rerun"
        else:
            diff = max(abs(a[s] - b[s]) for s in a)
            row.update(rerun=b[max(a)], diff=diff, status="match" if diff <= atol else "DIVERGED")
        rows.append(row)
    return rows


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.10g}"


def report(original, rerun, rows: list[dict], out=sys.stdout) -> None:
    print(f"original run {original.info.run_id} ({original.info.status})", file=out)
    print(f"rerun    run {rerun.info.run_id} ({rerun.info.status})", file=out)
    print(
        f"\n{'metric':<24} {'steps':>5} {'original':>16} {'rerun':>16} {'max |diff|':>12}  result", file=out
    )
    for r in rows:
        print(
            f"{r['metric']:<24} {r['steps']:>5} {_fmt(r['original']):>16} {_fmt(r['rerun']):>16} "
            f"{_fmt(r['diff']):>12}  {r['status']}",
            file=out,
        )
    print(f"\n{'lineage':<24} {'original':<34} {'rerun':<34}", file=out)
    for tag in LINEAGE_TAGS:
        a, b = original.data.tags.get(tag, "-"), rerun.data.tags.get(tag, "-")
        note = "" if a == b else "  (differs)"
        print(f"{tag:<24} {a[:32]:<34} {b[:32]:<34}{note}", file=out)
    diffs = config_differences(
        original.data.params, rerun.data.params, ignore=lambda k: k.startswith(("paths.", "tracking."))
    )
    print(f"\nconfig keys that differ (paths/tracking not shown): {len(diffs)}", file=out)
    for key, a, b in diffs:
        print(f"  {key}: {'-' if a is None else a} -> {'-' if b is None else b}", file=out)


def reproduce(run_id: str, extra: list[str], tracking_uri: str | None, atol: float) -> int:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    try:
        original = client.get_run(run_id)
    except MlflowException as err:
        raise ReproduceError(f"no run {run_id} in {uri}: {err}") from err
    overrides = rerun_overrides(fetch_overrides(client, run_id), extra)
    outputs = Path(str(_compose(overrides).paths.outputs))
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir = outputs / "runs" / f"reproduce-{run_id}-{stamp}"
    cmd = [sys.executable, "-m", "pipeline", *overrides, f"hydra.run.dir={run_dir}"]
    print(f"reproduce: rerunning {run_id} with overrides {overrides}", file=sys.stderr, flush=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("PIPELINE_MLFLOW_PARENT_RUN_ID", None)
    proc = subprocess.run(cmd, env=env)
    rerun = find_run_by_output_dir(client, run_dir)
    if rerun is None:
        print(f"reproduce: the rerun (exit {proc.returncode}) created no MLflow run", file=sys.stderr)
        return 1
    client.set_tag(rerun.info.run_id, "pipeline.reproduces", run_id)
    rerun = client.get_run(rerun.info.run_id)
    rows = compare(client, original, rerun, atol)
    report(original, rerun, rows)
    ok = proc.returncode == 0 and bool(rows) and all(r["status"] == "match" for r in rows)
    client.set_tag(rerun.info.run_id, "pipeline.reproduce_result", "match" if ok else "diverged")
    if proc.returncode != 0:
        print(f"\nreproduce: the rerun failed (exit {proc.returncode})")
    print(f"\nreproduce: {'MATCH' if ok else 'DIVERGED'} ({len(rows)} metrics compared, atol={atol})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.runs.reproduce", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_id", help="the MLflow run to rerun")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, applied after the original's")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else this project's store")
    parser.add_argument("--atol", type=float, default=0.0, help="allowed |difference| (default 0: exact)")
    args = parser.parse_args(argv)
    try:
        return reproduce(args.run_id, args.overrides, args.tracking_uri, args.atol)
    except ReproduceError as err:
        print(f"reproduce: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
