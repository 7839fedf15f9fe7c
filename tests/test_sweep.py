"""Real multiruns (`python -m pipeline -m ...` in a subprocess): parent/child runs, the sweep report,
the joblib and submitit_local launchers, one export per storage format, and optuna auto-tuning."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pipeline.tracking.sweep_report import CSV_NAME, MD_NAME, MEMORY_PNG, THROUGHPUT_PNG, WORKERS_PNG
from tests.conftest import run_cli, sqlite_uri

TINY = ["trainer.epochs=1", "model.hidden=[16]"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=sqlite_uri(root))


def _sweep_runs(root: Path):
    """(parent, children) of the only sweep in the store."""
    client = _client(root)
    exp = client.get_experiment_by_name("pipeline")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("pipeline.role") == "sweep"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1  # no orphan job runs
    return parent, children


def _sweep_dir(root: Path) -> Path:
    dirs = [p.parent for p in (root / "outputs" / "multiruns").glob("*/*/.mlflow_parent_run_id")]
    assert len(dirs) == 1
    return dirs[0]


def _artifacts(root: Path, run_id: str, path: str) -> set[str]:
    return {Path(f.path).name for f in _client(root).list_artifacts(run_id, path)}


def _check_report(root: Path, proc, n_children: int) -> tuple:
    """The parent carries the report; its table matches the children's own MLflow metrics."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent, children = _sweep_runs(root)
    assert len(children) == n_children
    assert parent.info.status == "FINISHED"
    assert {c.info.status for c in children} == {"FINISHED"}
    assert _artifacts(root, parent.info.run_id, "report") == {
        CSV_NAME,
        MD_NAME,
        THROUGHPUT_PNG,
        WORKERS_PNG,
        MEMORY_PNG,
    }

    report_dir = _sweep_dir(root) / "report"
    for png in (THROUGHPUT_PNG, MEMORY_PNG):
        assert (report_dir / png).read_bytes()[:8] == PNG_MAGIC
    rows = list(csv.DictReader(open(report_dir / CSV_NAME)))
    by_id = {c.info.run_id: c for c in children}
    assert sorted(r["run_id"] for r in rows) == sorted(by_id)
    for row in rows:
        child = by_id[row["run_id"]]
        for metric in (
            "perf/train_samples_per_s",
            "perf/epoch_seconds",
            "perf/data_wait_fraction",
            "val/accuracy",
            "memory/peak_used_mb",
        ):
            assert float(row[metric]) == pytest.approx(child.data.metrics[metric])
    # best = the child with the highest train samples/s; the parent is tagged with its overrides
    fastest = max(children, key=lambda c: c.data.metrics["perf/train_samples_per_s"])
    tags = parent.data.tags
    assert tags["sweep.best_run_id"] == fastest.info.run_id
    assert rows[0]["run_id"] == fastest.info.run_id  # sorted best first
    md = (report_dir / MD_NAME).read_text()
    assert tags["sweep.best_config"] in md
    assert "Sweep report" in proc.stdout and md.splitlines()[0] in proc.stdout
    return parent, children, rows


@pytest.mark.slow
def test_failed_job_marks_parent_failed_and_still_reports(tmp_path):
    # the second job is rejected by validation (batch larger than the train set with drop_last)
    # before its own run exists: the sweep is aborted, so its parent must not look FINISHED
    proc = run_cli(tmp_path, "-m", *TINY, "loader.drop_last=true", "loader.batch_size=64,5000")
    assert proc.returncode != 0
    parent, children = _sweep_runs(tmp_path)
    assert parent.info.status == "FAILED"
    assert [c.info.status for c in children] == ["FINISHED"]
    assert parent.data.tags["sweep.best_run_id"] == children[0].info.run_id
    rows = list(csv.DictReader(open(_sweep_dir(tmp_path) / "report" / CSV_NAME)))
    assert [r["run_id"] for r in rows] == [children[0].info.run_id]


@pytest.mark.slow
def test_joblib_sweep_exports_each_storage_once_with_loader_workers(tmp_path):
    """2 x 2 x 2 over batch size, workers and storage, two jobs at a time, on an empty data dir."""
    proc = run_cli(
        tmp_path,
        "-m",
        *TINY,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "loader.batch_size=32,128",
        "loader.num_workers=0,2",
        "storage=pt,npy",
        timeout=900,
    )
    parent, children, rows = _check_report(tmp_path, proc, 8)
    # one build per storage format, whichever job got there first; the others reused it
    built = [c.data.tags["data.dir"] for c in children if c.data.tags["data.reused"] == "false"]
    assert len(built) == 2 and len(set(built)) == 2
    assert len({c.data.tags["data.dir"] for c in children}) == 2
    exports = [p for p in (tmp_path / "outputs" / "data").iterdir() if not p.name.startswith(".")]
    assert len(exports) == 2
    # DataLoader workers ran inside the loky jobs; threads split between the parallel jobs
    assert {c.data.params["loader.num_workers"] for c in children} == {"0", "2"}
    from pipeline.training.threads import usable_cores

    assert {c.data.params["torch.num_threads"] for c in children} == {str(max(1, usable_cores() // 2))}


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    proc = run_cli(
        tmp_path,
        "-m",
        *TINY,
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.cpus_per_task=1",
        "loader.num_workers=0,1",
        timeout=900,
    )
    parent, children, rows = _check_report(tmp_path, proc, 2)
    assert {c.data.params["torch.num_threads"] for c in children} == {"1"}
    assert list(_sweep_dir(tmp_path).glob(".submitit/*/*_result.pkl"))


@pytest.mark.slow
def test_optuna_search_maximises_throughput(tmp_path):
    proc = run_cli(
        tmp_path,
        "hparams_search=loader_throughput",
        "hydra.sweeper.n_trials=3",
        *TINY,
        timeout=900,
    )
    parent, children, rows = _check_report(tmp_path, proc, 3)
    import yaml

    result = yaml.safe_load((_sweep_dir(tmp_path) / "optimization_results.yaml").read_text())
    fastest = max(children, key=lambda c: c.data.metrics["perf/train_samples_per_s"])
    # each trial returned its train samples/s: optuna's best value is the fastest child's
    assert result["best_value"] == pytest.approx(fastest.data.metrics["perf/train_samples_per_s"])
    assert {c.data.params["objective"] for c in children} == {"perf/train_samples_per_s"}
