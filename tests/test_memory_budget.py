"""trainer.memory_budget_mb: config checks, and both outcomes of a budgeted run (out-of-core vs ram)."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config.validate import ConfigError, validate
from pipeline.data.storage import formats
from pipeline.system.memory import MemoryBudgetExceeded
from tests.conftest import compose_cfg, run_cli, sqlite_uri

# the contiguous out-of-core format once it exists, else one file per sample
OUT_OF_CORE = "memmap" if "memmap" in formats() else "npy"
SAMPLE_BYTES = 62 * 47 * 4
MB = 1024 * 1024


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.memory_budget_mb=-5", "number of MB > 0"),
        ("trainer.memory_budget_mb=0", "number of MB > 0"),
        ("trainer.memory_budget_mb=20", "already holds before loading any data"),
        ("trainer.memory_interval_s=0", "seconds > 0"),
    ],
)
def test_budget_and_interval_config_errors(tmp_path, override, message):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=message) as err:
        validate(compose_cfg(tmp_path, [override]))
    assert err.value.key == key


def test_budget_off_and_generous_budget_validate(tmp_path):
    validate(compose_cfg(tmp_path, []))
    validate(compose_cfg(tmp_path, ["trainer.memory_budget_mb=100000"]))


def _runs(root) -> dict:
    client = MlflowClient(sqlite_uri(root))
    exp = client.get_experiment_by_name("pipeline")
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


@pytest.mark.slow  # ~8 s: three jobs; CI's test_out_of_core trains in a real cgroup
def test_budget_out_of_core_completes_ram_stops_and_fails(tmp_path):
    from pipeline.job import run

    common = [
        "source=synthetic",
        "source.num_samples=10000",  # 116 MB; storage=ram holds all of it in the main process
        "trainer.epochs=1",
        "model.hidden=[32]",
        "loader.batch_size=256",
        "trainer.memory_interval_s=0.05",
    ]
    run(compose_cfg(tmp_path, [f"storage={OUT_OF_CORE}", "tracking.run_name=probe", *common]))
    peak = _runs(tmp_path)["probe"].data.metrics["memory/peak_used_mb"]
    budget = round(peak + 50)  # room for the out-of-core run, 66 MB short of what ram needs
    with_budget = [f"trainer.memory_budget_mb={budget}", *common]

    run(compose_cfg(tmp_path, [f"storage={OUT_OF_CORE}", "tracking.run_name=ooc", *with_budget]))
    with pytest.raises(MemoryBudgetExceeded, match=rf"> trainer\.memory_budget_mb={budget} MB") as err:
        run(compose_cfg(tmp_path, ["storage=ram", "tracking.run_name=ram", *with_budget]))
    assert err.value.sample.used_mb > budget

    runs = _runs(tmp_path)
    assert runs["ooc"].info.status == "FINISHED"
    assert runs["ooc"].data.metrics["memory/peak_used_mb"] <= budget
    assert runs["ram"].info.status == "FAILED"
    assert "Memory budget exceeded: memory/used_mb reached" in runs["ram"].data.tags["error"]
    # the failed run still has its memory record, budget line included
    assert runs["ram"].data.metrics["memory/peak_used_mb"] > budget
    client = MlflowClient(sqlite_uri(tmp_path))
    assert "memory/memory_timeline.png" in {
        a.path for a in client.list_artifacts(runs["ram"].info.run_id, "memory")
    }


@pytest.mark.slow
def test_data_three_times_the_budget_trains_out_of_core_not_in_ram(tmp_path):
    """The issue's target through the real CLI: data >= 3x the budget."""
    common = ["source=synthetic", "trainer.epochs=1", "model.hidden=[32]", "loader.batch_size=256"]
    probe = run_cli(
        tmp_path, f"storage={OUT_OF_CORE}", "source.num_samples=2000", "tracking.run_name=probe", *common
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    budget = round(_runs(tmp_path)["probe"].data.metrics["memory/peak_used_mb"] + 100)
    n = math.ceil(3 * budget * MB / SAMPLE_BYTES)
    assert n * SAMPLE_BYTES >= 3 * budget * MB
    args = [f"source.num_samples={n}", f"trainer.memory_budget_mb={budget}", *common]

    ooc = run_cli(tmp_path, f"storage={OUT_OF_CORE}", "tracking.run_name=ooc", *args, timeout=1200)
    assert ooc.returncode == 0, ooc.stderr[-3000:]
    ram = run_cli(tmp_path, "storage=ram", "tracking.run_name=ram", *args, timeout=1200)
    assert ram.returncode != 0
    assert f"> trainer.memory_budget_mb={budget} MB" in ram.stderr
    runs = _runs(tmp_path)
    assert runs["ooc"].info.status == "FINISHED"
    assert runs["ram"].info.status == "FAILED"
    print(
        f"budget {budget} MB, data {n * SAMPLE_BYTES / MB:.0f} MB ({n} samples), {OUT_OF_CORE} peak "
        f"{runs['ooc'].data.metrics['memory/peak_used_mb']:.0f} MB"
    )
