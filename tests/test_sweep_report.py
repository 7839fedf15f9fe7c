"""The sweep report's table, ranking and plots from given rows; torch threads per job; sweep config."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.config.validate import ConfigError, validate
from pipeline.tracking.sweep_report import (
    CSV_NAME,
    MD_NAME,
    MEMORY_PNG,
    THROUGHPUT_PNG,
    WORKERS_PNG,
    Row,
    lower_is_better,
    make_report,
    parse_overrides,
    write_report,
)
from pipeline.training.threads import apply_torch_threads, auto_threads
from tests.conftest import CONF_DIR, compose_cfg


def _row(run_id, bs, nw, storage, sps, status="FINISHED", peak=300.0):
    overrides = {"trainer.epochs": "1", "loader.batch_size": bs, "loader.num_workers": nw, "storage": storage}
    metrics = {
        "perf/train_samples_per_s": sps,
        "perf/epoch_seconds": 1000 / sps,
        "perf/data_wait_fraction": 0.25,
        "val/accuracy": 0.9,
        "memory/peak_used_mb": peak,
    }
    axes = {"batch_size": bs, "num_workers": nw, "storage": storage}
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
    assert lower_is_better("perf/epoch_seconds") and lower_is_better("memory/peak_used_mb")
    assert not lower_is_better("val/accuracy") and not lower_is_better("perf/train_samples_per_s")
    assert make_report("p", _rows(), "memory/peak_used_mb").best.run_id in ("a", "b")
    assert make_report("p", _rows(), "perf/epoch_seconds").best.run_id == "b"


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
    assert "by DataLoader workers" in make_report("p", rows, "val/accuracy").markdown()


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
