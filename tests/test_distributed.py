"""torchrun, 2 CPU processes (gloo): one MLflow run, the global sample count, equal parameters per rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, sqlite_uri

TORCHRUN = Path(sys.executable).parent / "torchrun"

pytestmark = pytest.mark.slow  # ~25 s: two processes each import torch + mlflow


def _torchrun(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIPELINE_ROOT": str(root), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "pipeline", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_two_ranks_train_one_run_with_global_counts_and_equal_parameters(tmp_path):
    # digits: 1437 train samples -> shards of 719 and 718; batch 359 gives rank 0 three batches and
    # rank 1 two, so DDP's Join has to carry the uneven end of every epoch
    epochs = 2
    proc = _torchrun(tmp_path, f"trainer.epochs={epochs}", "loader.batch_size=359")
    assert proc.returncode == 0, proc.stderr[-5000:]

    client = MlflowClient(sqlite_uri(tmp_path))
    exp = client.get_experiment_by_name("pipeline")
    (run,) = client.search_runs([exp.experiment_id])  # one run per training, not one per rank
    assert run.info.status == "FINISHED"
    n_train = int(run.data.params["data.num_train"])
    assert n_train == 1437
    assert run.data.metrics["train/samples_seen"] == n_train * epochs  # global, exact (no padding)
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == epochs

    # both ranks ran in the same Hydra run dir and wrote their parameter digests there
    (run_dir,) = (tmp_path / "outputs" / "runs" / "torchrun").iterdir()
    infos = [json.loads((run_dir / "dist" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["rank"] for i in infos] == [0, 1] and {i["world_size"] for i in infos} == {2}
    digests = {i["params_sha256"] for i in infos}
    assert len(digests) == 1  # without DDP's gradient all-reduce the two shards would diverge
    assert run.data.tags["dist.params_sha256"] in digests
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "dist")}
    assert logged == {"dist/rank0.json", "dist/rank1.json"}
    # rank 1 kept its files apart and created no MLflow run of its own
    assert (run_dir / "rank1" / "split.npz").exists()
    assert "rank 1 of 2" in proc.stderr + (run_dir / "cli.log").read_text()
