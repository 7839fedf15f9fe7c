"""The whole job: export -> partition -> load -> train, recorded in MLflow SQLite; once through the real
CLI (the suite's end-to-end smoke test), then in-process."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline.data.partition import load_split
from tests.conftest import compose_cfg, run_cli, sqlite_uri
from tests.test_plots import PLOTS, _not_blank, _png

EPOCH_METRICS = [
    "train/loss",
    "train/accuracy",
    "val/loss",
    "val/accuracy",
    "perf/epoch_seconds",
    "perf/train_samples_per_s",
    "perf/data_wait_fraction",
    "memory/epoch_peak_used_mb",  # memory/used_mb itself is the sampled time series (test_memory.py)
    "memory/epoch_peak_mapped_file_mb",
    "memory/epoch_peak_rss_main_mb",
]


def _runs(root):
    client = MlflowClient(sqlite_uri(root))
    exp = client.get_experiment_by_name("pipeline")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _history(client, run, key):
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


@pytest.mark.fresh_store  # the job creates the store, as a new user's first run does
def test_default_job_end_to_end_and_rerun_reuses_everything(tmp_path):
    from pipeline.job import run as run_job

    first = run_cli(tmp_path, "trainer.epochs=2")
    assert first.returncode == 0, first.stderr
    client, (cli_run,) = _runs(tmp_path)
    # the rerun, in this process, with the CLI's torch thread count (float sums depend on it)
    threads = cli_run.data.params["torch.num_threads"]
    rerun_dir = tmp_path / "outputs" / "runs" / "in-process" / "rerun"
    run_job(
        compose_cfg(
            tmp_path,
            ["trainer.epochs=2", f"trainer.torch_threads={threads}", f"paths.output_dir={rerun_dir}"],
        )
    )

    client, runs = _runs(tmp_path)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    run = runs[0]
    for key in EPOCH_METRICS:
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    assert run.data.metrics["train/samples_seen"] == 1437 * 2
    assert run.data.metrics["memory/peak_used_mb"] > 50
    assert run.data.metrics["val/accuracy"] > 0.5
    params = run.data.params
    assert params["loader.batch_size"] == "64" and params["source.name"] == "digits"
    assert params["split.ratio"] == "0.8" and params["trainer.epochs"] == "2"
    tags = run.data.tags
    assert tags["hydra.overrides"] == "trainer.epochs=2"
    assert len(tags["data.fingerprint"]) == 16 and "git.commit" in tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"hydra", "split.npz", "data"} <= artifacts
    hydra_files = {a.path for a in client.list_artifacts(run.info.run_id, "hydra")}
    assert {"hydra/config.yaml", "hydra/overrides.yaml", "hydra/hydra.yaml"} <= hydra_files
    # its plots, drawn, and the job's whole log
    assert PLOTS <= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    local = client.download_artifacts(run.info.run_id, "plots", str(tmp_path / "down"))
    for name in PLOTS:
        _not_blank(_png(f"{local}/{name.split('/')[1]}"))
    log_text = open(client.download_artifacts(run.info.run_id, "cli.log", str(tmp_path / "down"))).read()
    assert f"MLflow: run {run.info.run_id}" in log_text and "epoch 2/2  train loss" in log_text

    # the rerun reused the export and reproduced the split and the metrics
    assert (runs[0].data.tags["data.reused"], runs[1].data.tags["data.reused"]) == ("false", "true")
    assert runs[0].data.tags["data.dir"] == runs[1].data.tags["data.dir"]
    assert runs[0].data.tags["split.digest"] == runs[1].data.tags["split.digest"]
    for key in ("train/loss", "val/loss", "val/accuracy"):
        assert _history(client, runs[0], key) == _history(client, runs[1], key), key
    splits = sorted((tmp_path / "outputs" / "runs").glob("*/*/split.npz"))
    assert len(splits) == 2
    np.testing.assert_array_equal(load_split(splits[0]).train, load_split(splits[1]).train)


def test_failing_job_is_marked_failed(tmp_path):
    from pipeline.data.sources.lfw import LFWUnavailable
    from pipeline.job import run

    overrides = [
        "experiment=seed_lfw",
        f"source.data_home={tmp_path}/no_lfw",
        "source.download_if_missing=false",
    ]
    with pytest.raises(LFWUnavailable, match="LFW data is not in"):
        run(compose_cfg(tmp_path, overrides))
    client, runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "LFWUnavailable" in runs[0].data.tags["error"]


def test_lfw_job_from_local_cache(tmp_path):
    from pipeline.job import run
    from tests.test_sources import make_lfw_cache

    make_lfw_cache(tmp_path / "sk", people=("A_B", "C_D"), per_person=5)
    overrides = ["experiment=seed_lfw", f"source.data_home={tmp_path}/sk", "trainer.epochs=1", "model=cnn"]
    run(compose_cfg(tmp_path, overrides))
    client, runs = _runs(tmp_path)
    assert runs[0].info.status == "FINISHED" and runs[0].data.metrics["train/samples_seen"] == 8
