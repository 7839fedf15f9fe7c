"""The metric registry (pipeline/metrics.py): exact lookups only, and what a real job logs is what the
registry defines; the runs table and the config's ``objective`` check read from it."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest

from pipeline import metrics
from pipeline.metrics import Direction, Logged
from tests.conftest import REPO, compose_cfg, run_command, sqlite_uri
from tests.run_helpers import FAST, client, run_id_for


def test_directions_of_the_metrics_that_rank_sweeps():
    lower = ["io/read_amplification", "perf/data_wait_fraction", "perf/epoch_seconds", "val/loss"]
    lower += ["memory/peak_used_mb", "memory/epoch_peak_used_mb", "io/remote_mb"]
    higher = ["val/accuracy", "perf/train_samples_per_s", "io/cache_hit_fraction", "export/samples_per_s"]
    higher += ["memory/min_system_available_mb", "export/mb_per_s"]
    none = ["train/samples_seen", "export/workers", "io/read_mb_per_s", "memory/used_mb", "memory/workers"]
    assert [metrics.get(n).direction for n in lower] == [Direction.LOWER] * len(lower)
    assert [metrics.get(n).direction for n in higher] == [Direction.HIGHER] * len(higher)
    assert [metrics.get(n).direction for n in none] == [Direction.NONE] * len(none)
    amp = metrics.get("io/read_amplification")
    assert sorted([7.5, 1.02, 1.9], key=amp.sort_key) == [1.02, 1.9, 7.5]
    acc = metrics.get("val/accuracy")
    assert sorted([0.5, 0.9, 0.7], key=acc.sort_key) == [0.9, 0.7, 0.5]


def test_every_entry_is_complete_and_prints():
    assert len(metrics.METRICS) == len({m.name for m in metrics.METRICS.values()})
    for name, m in metrics.METRICS.items():
        assert m.name == name and m.label and m.unit and m.description, name
        assert isinstance(m.direction, Direction) and isinstance(m.logged, Logged)
        assert m.format(1234.5678) and m.format(None) == "" and m.format(math.nan) == "", name
    assert metrics.get("perf/data_wait_fraction").format(0.254) == "25%"
    assert metrics.get("val/accuracy").format(0.91234) == "0.912"
    assert metrics.get("io/read_amplification").format(1.3749) == "1.37"
    assert metrics.get("memory/peak_used_mb").format(441.4) == "441"
    # the reserved names of the next issues say which issue logs them
    reserved = {n: m.planned for n, m in metrics.METRICS.items() if m.planned}
    assert reserved == {
        "io/remote_mb": "issue 19",
        "io/remote_mb_per_s": "issue 19",
        "io/cache_hit_fraction": "issue 19",
    }


@pytest.mark.parametrize(
    "name",
    [
        "val/acc",
        "accuracy",
        "val/accuracy_top5",
        "io/read_mb_total",
        "memory/peak_bogus_mb",
        "memory/peak_t",
        "",
    ],
)
def test_unknown_names_are_never_guessed(name):
    assert metrics.find(name) is None
    with pytest.raises(KeyError) as err:
        metrics.get(name)
    assert f"unknown metric {name!r}" in str(err.value) and "val/accuracy" in str(err.value)
    with pytest.raises(ValueError):
        metrics.rankable(name)


def test_rankable_refuses_counters_naming_the_rankable_metrics():
    with pytest.raises(ValueError, match="'train/samples_seen' has no direction") as err:
        metrics.rankable("train/samples_seen")
    assert "io/read_amplification" in str(err.value) and "train/samples_seen" not in metrics.RANKABLE
    assert metrics.rankable("io/read_amplification").lower_is_better


def test_memory_families_are_the_sampler_figures():
    from pipeline.system.memory import PEAK_KEYS, Snapshot

    figures = [f.name for f in dataclasses.fields(Snapshot) if f.name != "t"]
    assert list(metrics.MEMORY_FIGURES) == figures
    assert set(PEAK_KEYS) <= set(figures)  # every peak is a figure the sampler reads
    for fig in figures:
        assert metrics.get(f"memory/{fig}").logged is Logged.SERIES
    for fig in PEAK_KEYS:
        assert metrics.get(f"memory/peak_{fig}").direction is Direction.LOWER
        assert metrics.get(f"memory/epoch_peak_{fig}").logged is Logged.EPOCH
    assert metrics.get("memory/peak_used_mb").label == "peak MB"  # its own entry, not the family's


def test_objectives_are_the_per_epoch_metrics_with_a_direction(tmp_path):
    from pipeline.config.validate import OBJECTIVES, ConfigError, validate

    assert OBJECTIVES is metrics.OBJECTIVES
    assert {"val/accuracy", "perf/train_samples_per_s", "io/read_amplification"} <= set(OBJECTIVES)
    for name in OBJECTIVES:
        m = metrics.get(name)
        assert m.logged is Logged.EPOCH and m.direction is not Direction.NONE and not m.planned
    validate(compose_cfg(tmp_path, ["objective=io/read_amplification"]))
    # a counter, a figure logged once at the end (not returned to a sweeper), one not logged yet
    for bad in ("train/samples_seen", "memory/peak_used_mb", "io/cache_hit_fraction"):
        with pytest.raises(ConfigError) as err:
            validate(compose_cfg(tmp_path, [f"objective={bad}"]))
        assert err.value.key == "objective" and "val/accuracy" in str(err.value)


def test_the_registry_imports_nothing_heavy(tmp_path):
    code = (
        "import sys, pipeline.metrics, pipeline.runs.listing\n"
        "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'mlflow', 'numpy'}))\n"
    )
    proc = run_command(tmp_path, [sys.executable, "-c", code], timeout=60)
    assert proc.returncode == 0 and "HEAVY []" in proc.stdout, proc.stdout + proc.stderr


def test_docs_show_the_registry_table():
    """docs/tracking.md holds ``python -m pipeline.metrics``'s table as it is now."""
    assert metrics.markdown() in Path(REPO, "docs", "tracking.md").read_text()


def test_every_metric_a_real_job_logs_is_defined_and_every_defined_epoch_metric_is_logged(tmp_path):
    """A real two-epoch job (digits, MLflow SQLite): the names it logs (train.fit each epoch, the memory
    record at the end) cannot drift from the registry, nor the registry from them."""
    from pipeline.job import run
    from pipeline.system.iocount import disk_read_bytes

    out = tmp_path / "run"
    final = run(compose_cfg(tmp_path, [*FAST, "trainer.epochs=2", f"paths.output_dir={out}"]))
    run_id = run_id_for(tmp_path, out)
    c = client(tmp_path)
    logged = set(c.get_run(run_id).data.metrics)
    undefined = sorted(n for n in logged if metrics.find(n) is None)
    assert not undefined, f"logged but not in pipeline/metrics.py: {undefined}"

    cuda = {n for n in metrics.METRICS if "cuda" in n}  # this suite runs on the CPU
    no_io = set() if disk_read_bytes() is not None else {n for n in metrics.METRICS if n.startswith("io/")}
    # this job built its export, so the export's figures are logged too (a job that reuses one logs none)
    expected = {n for n, m in metrics.METRICS.items() if not m.planned} - cuda - no_io
    assert sorted(expected - logged) == [], "defined in pipeline/metrics.py but not logged by a job"
    assert c.get_run(run_id).data.metrics["export/workers"] == 1  # digits: one chunk, exported serially
    per_epoch = {n for n in expected if metrics.get(n).logged is Logged.EPOCH}
    for name in per_epoch:
        assert [m.step for m in c.get_metric_history(run_id, name)] == [0, 1], name
    # what the job returns (what a Hydra sweeper reads as ``objective``) is the per-epoch set
    assert set(final) == per_epoch
    assert set(metrics.OBJECTIVES) - cuda - no_io <= set(final)


def test_runs_table_columns_are_the_registry_labels_and_formats(tmp_path):
    """``pipeline-runs``' metric columns on runs of a real SQLite store: labels and formats of the registry,
    an empty cell for a metric a run lacks."""
    from mlflow.tracking import MlflowClient

    from pipeline.runs.listing import COLUMNS, render, rows

    c = MlflowClient(sqlite_uri(tmp_path))
    exp = c.create_experiment("pipeline", artifact_location=(tmp_path / "artifacts").as_uri())
    full = c.create_run(exp, run_name="full", tags={"pipeline.role": "job"}).info.run_id
    for name, value in {
        "val/accuracy": 0.91234,
        "perf/train_samples_per_s": 1063.6,
        "perf/data_wait_fraction": 0.254,
        "memory/peak_used_mb": 441.4,
    }.items():
        c.log_metric(full, name, value)
    c.set_terminated(full)
    part = c.create_run(exp, run_name="part", tags={"pipeline.role": "job"}).info.run_id
    c.log_metric(part, "val/accuracy", 0.5)
    c.set_terminated(part)

    header, table, _ = rows(c.search_runs([exp]))
    assert header[3:7] == ["val acc", "samples/s", "data wait", "peak MB"]
    assert header[3:7] == [metrics.get(n).label for n in COLUMNS]
    by_name = {r[1]: r for r in table}
    assert by_name["full"][3:7] == ["0.912", "1064", "25%", "441"]
    assert by_name["part"][3:7] == ["0.500", "", "", ""]
    assert "data wait" in render(header, table).splitlines()[0]
