"""The sweep report's table, ranking and plots from given rows and from a real MLflow SQLite store (the
ranking direction and the labels come from pipeline/metrics.py); torch threads per job; sweep config."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.config.validate import ConfigError, validate
from pipeline.tracking.sweep import SweepCallback
from pipeline.tracking.sweep_report import (
    CSV_NAME,
    MD_NAME,
    MEMORY_PNG,
    THROUGHPUT_PNG,
    WORKERS_PNG,
    Row,
    build_report,
    make_report,
    parse_overrides,
    publish_report,
    write_report,
)
from pipeline.training.threads import apply_torch_threads, auto_threads
from tests.conftest import CONF_DIR, compose_cfg, sqlite_uri


def _row(run_id, bs, nw, storage, sps, status="FINISHED", peak=300.0, threads="0", wait=0.25):
    overrides = {"trainer.epochs": "1", "loader.batch_size": bs, "loader.num_workers": nw, "storage": storage}
    metrics = {
        "perf/train_samples_per_s": sps,
        "perf/epoch_seconds": 1000 / sps,
        "perf/data_wait_fraction": wait,
        "val/accuracy": 0.9,
        "memory/peak_used_mb": peak,
    }
    axes = {"batch_size": bs, "num_workers": nw, "storage": storage, "decode_threads": threads}
    return Row(run_id, f"run-{run_id}", status, overrides, axes, metrics)


def _rows():
    return [
        _row("a", "32", "0", "pt", 1000.0),
        _row("b", "64", "0", "pt", 3000.0),
        _row("c", "32", "2", "npy", 2000.0, peak=500.0),
        _row("d", "64", "2", "npy", 9000.0, status="FAILED"),
    ]


def test_parse_overrides_keeps_job_keys_only():
    text = "loader.batch_size=64 +trainer.x=1 hydra.launcher.n_jobs=2 'model.hidden=[16, 8]' storage=npy"
    assert parse_overrides(text) == {
        "loader.batch_size": "64",
        "trainer.x": "1",
        "model.hidden": "[16, 8]",
        "storage": "npy",
    }


def test_report_ranks_finished_runs_and_shows_only_swept_keys():
    report = make_report("parent", _rows(), "perf/train_samples_per_s")
    assert [r.run_id for r in report.rows] == ["b", "c", "a", "d"]  # the failed one last, however fast
    assert report.best.run_id == "b"
    assert report.swept == ["loader.batch_size", "loader.num_workers", "storage"]
    md = report.markdown()
    assert md.splitlines()[0].startswith(
        "| run | status | loader.batch_size | loader.num_workers | storage |"
    )
    assert "loader.batch_size=64 loader.num_workers=0 storage=pt -> 3000" in md


def test_report_ranks_time_and_memory_lowest_first():
    assert make_report("p", _rows(), "memory/peak_used_mb").best.run_id in ("a", "b")
    assert make_report("p", _rows(), "perf/epoch_seconds").best.run_id == "b"
    assert make_report("p", _rows(), "val/accuracy").best_line().startswith("Best by val/accuracy (highest)")


def _io_rows():
    """Three finished runs whose read amplification and data wait are both lowest in run "lean"."""
    figures = {"lean": (1.02, 0.05, 900.0), "mid": (1.9, 0.30, 1500.0), "wasteful": (7.5, 0.60, 1200.0)}
    rows = []
    for i, (name, (amp, wait, sps)) in enumerate(figures.items()):
        row = _row(name, str(32 * 2**i), "0", "shards", sps)
        row.metrics.update({"io/read_amplification": amp, "perf/data_wait_fraction": wait})
        rows.append(row)
    return rows


@pytest.mark.parametrize("metric", ["io/read_amplification", "perf/data_wait_fraction"])
def test_read_amplification_and_data_wait_rank_lowest_first(metric):
    """Both hold words the old name-based guess missed or mixed up ("amplification" is no time, loss or
    memory); the registry says lower is better."""
    report = make_report("p", _io_rows(), metric)
    assert [r.run_id for r in report.rows] == ["lean", "mid", "wasteful"]
    assert report.best.run_id == "lean"
    assert report.best_line().startswith(f"Best by {metric} (lowest): ")
    assert report.description().startswith(f"**Best** (lowest `{metric}`): **run-lean** = ")
    # the metric ranked by is a column of the table (added when not a default one), with its label
    label = {"io/read_amplification": "read amp", "perf/data_wait_fraction": "data wait"}[metric]
    assert report.header().count(label) == 1
    # the fastest run (mid) is not the best by these
    assert make_report("p", _io_rows(), "perf/train_samples_per_s").best.run_id == "mid"


def test_table_prints_each_metric_in_the_registry_format():
    report = make_report("p", _io_rows()[:1], "io/read_amplification")
    cells = dict(zip(report.header(), report.records()[0]))
    assert cells["samples/s"] == "900" and cells["data wait"] == "5%" and cells["val acc"] == "0.900"
    assert cells["epoch s"] == "1.111" and cells["peak MB"] == "300" and cells["read amp"] == "1.02"


@pytest.mark.parametrize(
    "rank_by, message",
    [
        ("io/read_amp", "did you mean io/read_mb or io/read_amplification?"),
        ("amplification", "unknown metric 'amplification'"),
        ("train/samples_seen", "has no direction"),
        ("io/read_mb_per_s", "has no direction"),
    ],
)
def test_report_refuses_a_metric_it_cannot_rank_by_naming_valid_ones(rank_by, message):
    with pytest.raises(ValueError) as err:
        make_report("p", _rows(), rank_by)
    assert message in str(err.value)
    assert "perf/data_wait_fraction" in str(err.value) and "io/read_amplification" in str(err.value)


def test_sweep_callback_refuses_a_bad_rank_by_when_it_is_built():
    with pytest.raises(KeyError, match="unknown metric 'val/acc' \\(did you mean val/accuracy"):
        SweepCallback(rank_by="val/acc")
    with pytest.raises(ValueError, match="no direction"):
        SweepCallback(rank_by="train/samples_seen")
    assert SweepCallback(report=False, rank_by="val/acc").report is False  # no report: nothing to rank


def test_report_from_a_real_store_ranks_read_amplification_lowest_first(tmp_path):
    """Child runs logged to the test's MLflow SQLite store, read back by build_report/publish_report."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    uri = sqlite_uri(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("sweeps", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="sweep").info.run_id
    ids = {}
    for row in _io_rows():
        run = client.create_run(exp, run_name=row.run_id, tags={"mlflow.parentRunId": parent})
        ids[row.run_id] = run.info.run_id
        overrides = " ".join(f"{k}={v}" for k, v in row.overrides.items())
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, v, 0, 0) for k, v in row.metrics.items()],
            params=[Param(f"loader.{k}", row.axes[k]) for k in ("batch_size", "num_workers")]
            + [Param("storage.name", "shards")],
            tags=[RunTag("hydra.overrides", overrides)],
        )
        client.set_terminated(run.info.run_id)
    with pytest.raises(KeyError, match="unknown metric"):  # refused before MLflow is asked anything
        build_report(uri, "no-such-run", "io/read_amp")

    report = publish_report(uri, parent, tmp_path / "report", "io/read_amplification")
    assert [r.run_name for r in report.rows] == ["lean", "mid", "wasteful"]
    tags = client.get_run(parent).data.tags
    assert tags["sweep.best_run_id"] == ids["lean"] and tags["sweep.best_value"] == "1.02"
    assert tags["sweep.best_config"] == "loader.batch_size=32"
    rows = list(csv.DictReader(open(tmp_path / "report" / CSV_NAME)))
    assert [r["run"] for r in rows] == ["lean", "mid", "wasteful"]
    assert [float(r["io/read_amplification"]) for r in rows] == [1.02, 1.9, 7.5]
    assert build_report(uri, parent, "perf/data_wait_fraction").best.run_name == "lean"
    assert build_report(uri, parent, "perf/train_samples_per_s").best.run_name == "mid"


def test_report_without_a_finished_run_names_no_best():
    report = make_report("p", [_row("x", "32", "0", "pt", 10.0, status="FAILED")], "val/accuracy")
    assert report.best is None
    assert "No finished child run" in report.markdown()


def test_write_report_files(tmp_path):
    report = make_report("parent", _rows(), "perf/train_samples_per_s")
    paths = write_report(report, tmp_path)
    assert {p.name for p in paths} == {CSV_NAME, MD_NAME, THROUGHPUT_PNG, WORKERS_PNG, MEMORY_PNG}
    rows = list(csv.DictReader(open(tmp_path / CSV_NAME)))
    assert [r["run_id"] for r in rows] == ["b", "c", "a", "d"]
    assert float(rows[0]["perf/train_samples_per_s"]) == 3000.0
    assert not math.isnan(float(rows[2]["memory/peak_used_mb"]))
    for png in (THROUGHPUT_PNG, WORKERS_PNG, MEMORY_PNG):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_worker_scaling_table_per_storage_and_batch_size():
    rows = [
        _row("a", "64", "0", "memmap", 1000.0),
        _row("b", "64", "2", "memmap", 500.0),
        _row("c", "64", "0", "encoded", 100.0),
        _row("d", "64", "2", "encoded", 180.0),
        _row("e", "64", "2", "encoded", 200.0),  # a repeat: averaged
        _row("f", "64", "4", "encoded", 9999.0, status="FAILED"),  # left out
        _row("g", "32", "2", "encoded", 50.0),  # no 0-worker run: no ratio
    ]
    lines = make_report("p", rows, "perf/train_samples_per_s").worker_scaling()
    assert lines[2] == "| storage | batch size | 0 workers | 2 workers |"
    assert "| encoded | 32 |  | 50 |" in lines
    assert "| encoded | 64 | 100 | 190 (1.90x) |" in lines
    assert "| memmap | 64 | 1,000 | 500 (0.50x) |" in lines
    assert make_report("p", rows[:1], "val/accuracy").worker_scaling() == []  # one worker count: no table
    assert "by loader workers and decode threads" in make_report("p", rows, "val/accuracy").markdown()


def test_worker_scaling_counts_decode_threads_and_says_which_setting_won_and_why():
    rows = [
        _row("a", "64", "0", "encoded", 100.0, wait=0.6),
        _row("b", "64", "2", "encoded", 170.0, wait=0.1),
        _row("c", "64", "0", "encoded", 160.0, threads="2", wait=0.2),
        _row("d", "64", "0", "shards", 5000.0, wait=0.03),
        _row("e", "64", "2", "shards", 4900.0, wait=0.02),
    ]
    lines = make_report("p", rows, "perf/train_samples_per_s").worker_scaling()
    assert lines[2] == "| storage | batch size | 0 workers | 0 workers, 2 threads | 2 workers |"
    assert "| encoded | 64 | 100 | 160 (1.60x) | 170 (1.70x) |" in lines
    verdicts = [line for line in lines if line.startswith("- ")]
    assert verdicts[0].startswith("- encoded, batch 64: 2 workers won (170 samples/s, 1.70x 0 workers)")
    assert "waited 60% of the epoch for data (decoding was the bottleneck), with 2 workers 10%" in verdicts[0]
    assert verdicts[1].startswith("- shards, batch 64: 0 workers won (5,000 samples/s)")
    assert "waited 3% of the epoch for data, so the model, not the data, bounds the epoch" in verdicts[1]


def test_auto_threads_split_cores_between_parallel_jobs():
    assert auto_threads(cores=2, jobs=2, slurm_cpus=None) == 1
    assert auto_threads(cores=16, jobs=3, slurm_cpus=None) == 5
    assert auto_threads(cores=2, jobs=8, slurm_cpus=None) == 1
    assert auto_threads(cores=64, jobs=None, slurm_cpus="8") == 8
    assert auto_threads(cores=64, jobs=None, slurm_cpus=None, cpus_per_task=3) == 3  # submitit
    assert auto_threads(cores=64, jobs=None, slurm_cpus=None) is None  # keep torch's default


def test_apply_torch_threads_sets_an_explicit_count():
    before = torch.get_num_threads()
    try:
        assert apply_torch_threads(1) == 1 == torch.get_num_threads()
        assert apply_torch_threads("auto") == 1  # outside a parallel launcher: left as it is
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.torch_threads=0", "trainer.torch_threads"),
        ("trainer.torch_threads=many", "trainer.torch_threads"),
        ("objective=val/acc", "objective"),
    ],
)
def test_bad_sweep_settings_are_rejected(tmp_path, override, key):
    cfg = compose_cfg(tmp_path, [override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key


def test_hparams_search_preset_composes(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"paths.root={tmp_path}", "hparams_search=loader_throughput"],
            return_hydra_config=True,
        )
    assert cfg.objective == "perf/train_samples_per_s"
    assert "optuna" in cfg.hydra.sweeper._target_.lower()
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.hydra.sweeper.storage is None
    assert set(cfg.hydra.sweeper.params) == {
        "loader.batch_size",
        "loader.num_workers",
        "loader.prefetch_factor",
        "loader.thread_prefetch",
        "storage",
    }
    assert "memmap" in cfg.hydra.sweeper.params.storage and "shards" in cfg.hydra.sweeper.params.storage
    validate(cfg)


def test_slurm_launcher_config_composes(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"paths.root={tmp_path}", "hydra/launcher=slurm"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.cpus_per_task >= 1
