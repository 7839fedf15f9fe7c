"""Training end to end on the fast formats, with and without in-process prefetch."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline.job import run
from tests.conftest import compose_cfg, sqlite_uri


@pytest.mark.parametrize(
    "overrides",
    [
        ["storage=memmap", "loader.thread_prefetch=2", "loader.drop_last=true", "loader.batch_size=50"],
        ["storage=shards", "storage.shard_size_mb=0.02", "storage.shuffle_buffer_shards=2"],
        pytest.param(  # slow: test_determinism runs shards with 2 workers in the default suite
            ["storage=shards", "loader.num_workers=2", "loader.thread_prefetch=1"], marks=pytest.mark.slow
        ),
    ],
)
def test_training_runs_on_fast_formats(tmp_path, overrides):
    cfg = compose_cfg(tmp_path, ["trainer.epochs=2", *overrides])
    final = run(cfg)
    n_train = int(1797 * 0.8)
    per_epoch = n_train // 50 * 50 if "loader.drop_last=true" in overrides else n_train
    assert final["train/samples_seen"] == 2 * per_epoch
    assert final["val/accuracy"] > 0.3
    assert 0 <= final["perf/data_wait_fraction"] < 1
    client = MlflowClient(sqlite_uri(tmp_path))
    (run_info,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert run_info.info.status == "FINISHED"
    assert run_info.data.params["storage.name"] == cfg.storage.name
