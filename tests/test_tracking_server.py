"""A shared tracking server: a real ``mlflow server`` (SQLite backend, proxied artifacts) on 127.0.0.1,
a 2-job multirun logging to it through MLFLOW_TRACKING_URI, everything read back through its REST API,
then the server stopped with no process left."""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request

import pytest

from tests.conftest import run_cli
from tests.mlflow_server import serve


def _get(url: str, endpoint: str, **params) -> dict:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}?{query}", timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


# ~50 s on 2 busy cores: server start ~12 s, two jobs each importing mlflow; the local store must stay absent
pytestmark = [pytest.mark.slow, pytest.mark.fresh_store]


def test_multirun_against_a_tracking_server(tmp_path, mlflow_template):
    store = tmp_path / "server"
    with serve(store, template=mlflow_template) as url:
        _multirun_and_read_back(tmp_path, url)
    pgid = int((store / "server.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # the CLI and its uvicorn worker are gone


def _multirun_and_read_back(tmp_path, url: str) -> None:
    proc = run_cli(
        tmp_path,
        "-m",
        "loader.batch_size=32,64",
        "trainer.epochs=1",
        env={"MLFLOW_TRACKING_URI": url},
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # nothing went to the local default store

    exps = _post(url, "experiments/search", {"max_results": 100})["experiments"]
    (exp,) = [e for e in exps if e["name"] == "pipeline"]
    assert exp["artifact_location"].startswith("mlflow-artifacts:")  # artifacts go through the server
    runs = _post(url, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]

    def tags(run):
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    parents = [r for r in runs if tags(r).get("pipeline.role") == "sweep"]
    children = [r for r in runs if tags(r).get("pipeline.role") == "job"]
    assert len(parents) == 1 and len(children) == 2
    parent_id = parents[0]["info"]["run_id"]
    assert parents[0]["info"]["status"] == "FINISHED"
    assert {tags(c)["mlflow.parentRunId"] for c in children} == {parent_id}
    assert all(c["info"]["status"] == "FINISHED" for c in children)
    batch_sizes = {
        p["value"] for c in children for p in c["data"]["params"] if p["key"] == "loader.batch_size"
    }
    assert batch_sizes == {"32", "64"}

    for child in children:
        run_id = child["info"]["run_id"]
        n_train = next(int(p["value"]) for p in child["data"]["params"] if p["key"] == "data.num_train")
        history = _get(url, "metrics/get-history", run_id=run_id, metric_key="train/samples_seen")["metrics"]
        assert [m["value"] for m in history] == [n_train]
        losses = _get(url, "metrics/get-history", run_id=run_id, metric_key="train/loss")["metrics"]
        assert len(losses) == 1 and losses[0]["step"] == 0
        top = {f["path"] for f in _get(url, "artifacts/list", run_id=run_id)["files"]}
        assert {"hydra", "data", "plots", "split.npz"} <= top
        plots = {f["path"] for f in _get(url, "artifacts/list", run_id=run_id, path="plots")["files"]}
        assert "plots/loss.png" in plots
        # the bytes are on the server's artifact destination, not only on this machine
        with urllib.request.urlopen(
            f"{url}/api/2.0/mlflow-artifacts/artifacts/{exp['experiment_id']}/{run_id}/artifacts/split.npz",
            timeout=30,
        ) as r:
            assert r.read()[:2] == b"PK"  # an .npz is a zip
