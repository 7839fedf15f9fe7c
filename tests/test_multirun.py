"""A real Hydra multirun: one MLflow parent run per sweep, one child per job, the sweep report on the
parent; a failed job fails the parent."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from tests.conftest import run_cli, sqlite_uri
from tests.test_sweep import _check_report, _sweep_dir


def test_2x2_multirun_gives_four_children_under_one_parent_and_a_report(tmp_path):
    proc = run_cli(tmp_path, "-m", "loader.batch_size=32,64", "loader.num_workers=0,2", "trainer.epochs=1")
    # every child FINISHED under one FINISHED parent, which carries the report of their own metrics
    parent, children, rows = _check_report(tmp_path, proc, 4)
    assert all(c.data.tags["pipeline.role"] == "job" for c in children)
    assert parent.data.tags["pipeline.role"] == "sweep"
    combos = {(c.data.params["loader.batch_size"], c.data.params["loader.num_workers"]) for c in children}
    assert combos == {("32", "0"), ("32", "2"), ("64", "0"), ("64", "2")}
    # one export shared by all four jobs
    assert len({c.data.tags["data.dir"] for c in children}) == 1
    assert sorted(c.data.tags["data.reused"] for c in children) == ["false", "true", "true", "true"]

    # the swept keys are the report's columns, a key common to every job is not
    assert {(r["loader.batch_size"], r["loader.num_workers"]) for r in rows} == combos
    assert "trainer.epochs" not in rows[0]
    fastest = max(children, key=lambda c: c.data.metrics["perf/train_samples_per_s"])
    best = f"loader.batch_size={fastest.data.params['loader.batch_size']}"
    assert parent.data.tags["sweep.best_config"] == (
        f"{best} loader.num_workers={fastest.data.params['loader.num_workers']}"
    )
    # the parent's id reached the jobs through the sweep dir too
    assert (_sweep_dir(tmp_path) / ".mlflow_parent_run_id").read_text().strip() == parent.info.run_id


def test_failed_job_fails_the_sweep_parent(tmp_path):
    proc = run_cli(
        tmp_path,
        "-m",
        "source=lfw",
        f"source.data_home={tmp_path}/none",
        "source.download_if_missing=false",
        "trainer.epochs=1",
    )
    assert proc.returncode != 0
    client = MlflowClient(sqlite_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    statuses = {r.data.tags.get("pipeline.role"): r.info.status for r in runs}
    assert statuses == {"sweep": "FAILED", "job": "FAILED"}
