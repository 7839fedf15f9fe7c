"""torchrun, 2 CPU processes (gloo): one MLflow run, the global sample count, equal parameters per rank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_command, sqlite_uri

TORCHRUN = Path(sys.executable).parent / "torchrun"

pytestmark = pytest.mark.slow  # ~25 s: two processes each import torch + mlflow


def _torchrun(root: Path, *args: str) -> subprocess.CompletedProcess:
    return run_command(root, [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "pipeline", *args])


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


@pytest.mark.parametrize("storage", ["memmap", "shards"])
def test_formats_with_their_own_batches_are_dealt_out_to_the_ranks(tmp_path, storage):
    """memmap/shards make whole batches themselves: rank r takes batches r, r+2, ... -- every sample once."""
    epochs = 2
    proc = _torchrun(tmp_path, f"storage={storage}", f"trainer.epochs={epochs}", "loader.batch_size=100")
    assert proc.returncode == 0, proc.stderr[-5000:]
    client = MlflowClient(sqlite_uri(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train/samples_seen"] == 1437 * epochs  # 15 batches: 8 + 7, the last short
    (run_dir,) = (tmp_path / "outputs" / "runs" / "torchrun").iterdir()
    digests = {json.loads((run_dir / "dist" / f"rank{r}.json").read_text())["params_sha256"] for r in (0, 1)}
    assert len(digests) == 1


def test_drop_last_counts_what_each_rank_trained_on_also_after_resume(tmp_path):
    """101 train samples in one shard, whose records shards deal to 2 ranks as 51 + 50; batch 32 with
    drop_last: each rank drops its own short batch, so 32 + 32 = 64 samples per epoch are trained on (not
    floor(101 / 32) * 32 = 96). A run resumed under torchrun carries the counted figure over from its
    checkpoint."""
    args = ["source=synthetic", "source.num_samples=127", "storage=shards", "loader.batch_size=32"]
    proc = _torchrun(tmp_path, *args, "loader.drop_last=true", "trainer.epochs=1")
    assert proc.returncode == 0, proc.stderr[-5000:]
    client = MlflowClient(sqlite_uri(tmp_path))
    (first,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert first.data.params["data.num_train"] == "101"
    assert first.data.metrics["train/samples_seen"] == 64
    resume = f"trainer.resume={first.info.run_id}"
    proc = _torchrun(tmp_path, *args, "loader.drop_last=true", "trainer.epochs=2", resume)
    assert proc.returncode == 0, proc.stderr[-5000:]
    resumed = client.get_run(client.get_run(first.info.run_id).data.tags["pipeline.resumed_by"])
    history = client.get_metric_history(resumed.info.run_id, "train/samples_seen")
    assert sorted(m.value for m in history) == [64, 128]


def test_rank_batches_split_every_sample_once():
    from pipeline.data.sampling import RandomBatchSampler, RankBatches

    for n, bs, drop_last in [(1437, 100, False), (1437, 100, True), (10, 3, False), (4, 5, False)]:
        seen, counted = [], 0
        for r in range(3):
            part = RankBatches(RandomBatchSampler(n, bs, True, drop_last, seed=7), r, 3)
            mine = [int(i) for b in part for i in b]
            assert len(mine) == part.num_samples and len(list(part)) == len(part)
            seen += mine
            counted += part.num_samples
        expected = (n // bs) * bs if drop_last else n
        assert counted == expected and len(set(seen)) == expected
