"""A real Hydra multirun: one MLflow parent run per sweep, one child per job."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from tests.conftest import run_cli, sqlite_uri


def test_2x2_multirun_gives_four_children_under_one_parent(tmp_path):
    proc = run_cli(tmp_path, "-m", "loader.batch_size=32,64", "loader.num_workers=0,2", "trainer.epochs=1")
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(sqlite_uri(tmp_path))
    exp = client.get_experiment_by_name("pipeline")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pipeline.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("pipeline.role") == "job"]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    combos = {(c.data.params["loader.batch_size"], c.data.params["loader.num_workers"]) for c in children}
    assert combos == {("32", "0"), ("32", "2"), ("64", "0"), ("64", "2")}
    # one export shared by all four jobs
    assert len({c.data.tags["data.dir"] for c in children}) == 1
    assert sorted(c.data.tags["data.reused"] for c in children) == ["false", "true", "true", "true"]


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
