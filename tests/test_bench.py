"""``python -m pipeline.bench`` end to end on a tiny config: CSV, chart and MLflow run."""

from __future__ import annotations

import csv
import shutil
import sys

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from pipeline.bench import schema
from pipeline.bench.schema import storage_options, validate
from pipeline.config.validate import ConfigError
from pipeline.data.storage.shards import ShardsConfig as ShardsStorageConfig
from tests.conftest import CONF_DIR, compose_cfg, run_command, sqlite_uri

TINY = [
    "source.num_samples=300",
    "source.shape=[6,5]",
    "source.num_classes=4",
    "bench.min_passes=1",
    "bench.min_seconds=0",
    "bench.max_passes=2",
]


def run_bench(root, *args):
    return run_command(root, [sys.executable, "-m", "pipeline.bench", *args])


def test_bench_writes_csv_chart_and_mlflow_run(tmp_path):
    proc = run_bench(
        tmp_path,
        *TINY,
        "bench.storages=[shards]",
        "bench.num_workers=[0,1]",
        "bench.thread_prefetch=[0,2]",
        "storage=shards",
        "storage.shard_size_mb=0.01",
        "storage.shuffle_buffer_shards=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = list((tmp_path / "outputs" / "bench").glob("*/*"))
    with open(run_dir / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    for col in (
        "storage,num_workers,batch_size,prefetch,samples_per_s,mb_per_s,bytes_per_sample,peak_used_mb,"
        "ratio_vs_pt,ratio_vs_ram,first_batch_ms,peak_mapped_file_mb,shuffle_quality,cache,memory_limit_mb,"
        "disk_read_mb,read_amplification,ratio_vs_disk,disk_mb_per_s,cgroup_peak_mb"
    ).split(","):
        assert col in rows[0], col
    points = {(r["storage"], r["num_workers"], r["prefetch"]) for r in rows}
    assert {("shards", w, p) for w in "01" for p in "02"} <= points
    assert ("pt", "0", "0") in points and ("numpy_ram", "0", "0") in points  # both baselines
    assert len(rows) == 6
    by = {(r["storage"], r["num_workers"], r["prefetch"]): r for r in rows}
    assert float(by["pt", "0", "0"]["ratio_vs_pt"]) == 1.0
    assert float(by["numpy_ram", "0", "0"]["ratio_vs_ram"]) == 1.0
    assert all(float(r["samples_per_s"]) > 0 and float(r["peak_used_mb"]) > 0 for r in rows)
    assert float(by["shards", "0", "0"]["shuffle_quality"]) < 1.5
    on_disk = {name: float(by[name, "0", "0"]["bytes_per_sample"]) for name in ("shards", "pt", "numpy_ram")}
    assert on_disk["numpy_ram"] == 6 * 5 * 4  # float32 samples of 6x5
    # shards: .npy headers, an index and the placement (8 bytes a sample); pt: a file each
    assert 128 < on_disk["shards"] < 140 < 500 < on_disk["pt"]
    assert {r["cache"] for r in rows} == {"warm"} and {r["memory_limit_mb"] for r in rows} == {""}
    assert len({r["disk_mb_per_s"] for r in rows}) == 1 and float(rows[0]["disk_mb_per_s"]) > 0
    for r in rows:  # samples/s over the disk's sequential bandwidth in samples/s of the format's bytes
        disk_sps = float(r["disk_mb_per_s"]) * 1e6 / float(r["bytes_per_sample"])
        assert float(r["ratio_vs_disk"]) == pytest.approx(
            float(r["samples_per_s"]) / disk_sps, rel=1e-2, abs=1e-4
        )
    png = (run_dir / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "samples/s" in proc.stderr + proc.stdout

    client = MlflowClient(sqlite_uri(tmp_path))
    (exp,) = [e for e in client.search_experiments() if e.name == "pipeline"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["pipeline.role"] == "bench"
    assert {"results.csv", "results.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "shards_w0_b64_p0/ratio_vs_ram" in run.data.metrics
    assert {"shards_w0_b64_p0/read_amplification", "disk/sequential_mb_per_s"} <= set(run.data.metrics)


@pytest.mark.slow  # a bench run that drops the whole machine's page cache before each pass (as root)
def test_cold_capped_bench_reads_from_disk_in_a_cgroup(tmp_path):
    proc = run_bench(
        tmp_path, *TINY, "bench.storages=[memmap]", "bench.cache=cold", "bench.memory_limit_mb=200"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = list((tmp_path / "outputs" / "bench").glob("*/*"))
    out = proc.stdout + proc.stderr
    with open(run_dir / "results.csv") as fh:
        by = {r["storage"]: r for r in csv.DictReader(fh)}
    for name in ("pt", "memmap"):  # the baseline runs in the same conditions
        row = by[name]
        assert row["cache"] == "cold"
        # every cold pass fetched its samples from the disk: at least their bytes (240 train x 120 bytes)
        assert float(row["disk_read_mb"]) >= 240 * 120 / 1e6 and float(row["read_amplification"]) >= 1.0
        if row["memory_limit_mb"]:  # capped in a real cgroup, which saw the pass's memory
            assert float(row["memory_limit_mb"]) == 200 and float(row["cgroup_peak_mb"]) > 0
        else:  # no cgroup here: the log says why
            assert "bench.memory_limit_mb=200 not applied" in out
    assert by["numpy_ram"]["cache"] == "warm" and by["numpy_ram"]["memory_limit_mb"] == ""
    assert "dropped before each pass" in out


def test_bad_cache_state_fails_composition_naming_the_valid_ones(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose_bench(tmp_path, ["bench.cache=lukewarm"])
    assert "expected one of [warm, cold]" in str(err.value.__cause__)


def compose_bench(root, overrides=()):
    schema.register()  # base_bench, and the product's schemas and resolvers
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            config_name="bench",
            overrides=[f"paths.root={root}", f"paths.output_dir={root}/run", *TINY, *overrides],
        )


@pytest.mark.parametrize(
    "override, key",
    [
        ("bench.storages=[memmap,tape]", "bench.storages"),
        ("bench.batch_sizes=[0]", "bench.batch_sizes"),
        ("bench.num_workers=[]", "bench.num_workers"),
        ("bench.thread_prefetch=[-1]", "bench.thread_prefetch"),
        ("bench.max_passes=0", "bench.max_passes"),
        ("bench.memory_limit_mb=-1", "bench.memory_limit_mb"),
        ("loader.pin_memory=maybe", "loader.pin_memory"),
        ("storage=shards storage.shard_size_mb=0", "storage.shard_size_mb"),
    ],
)
def test_bad_bench_config_is_named(tmp_path, override, key):
    cfg = compose_bench(tmp_path, override.split())
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_bad_bench_grid_fails_before_any_work(tmp_path):
    proc = run_bench(tmp_path, *TINY, "bench.storages=[memmap,tape]")
    assert proc.returncode != 0
    assert "bench.storages" in proc.stderr and "memmap" in proc.stderr
    assert not (tmp_path / "outputs" / "data").exists()


def test_other_formats_use_their_yaml(tmp_path):
    cfg = compose_cfg(tmp_path, ["storage=shards", "storage.shard_size_mb=3"])
    assert storage_options("shards", cfg.storage).shard_size_mb == 3
    assert storage_options("memmap", cfg.storage).name == "memmap"
    other = storage_options("shards", compose_cfg(tmp_path, ["storage=memmap"]).storage)
    assert other.shard_size_mb == 64 and other.shuffle_buffer_shards == 4
    assert OmegaConf.get_type(other) is ShardsStorageConfig  # on its schema: a wrong key fails
    with pytest.raises(ConfigAttributeError):
        other.shard_size = 8


def test_other_formats_come_from_the_running_apps_search_path(tmp_path):
    """Inside an initialized Hydra (as in ``python -m pipeline.bench``) the other formats' options are
    composed from that app's config dir, not read from a fixed folder."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "storage" / "shards.yaml").write_text("defaults:\n  - base_shards\nshard_size_mb: 7\n")
    schema.register()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        current = compose(config_name="bench", overrides=[f"paths.root={tmp_path}"]).storage
        assert current.name == "memmap"
        assert storage_options("shards", current).shard_size_mb == 7


@pytest.mark.slow
def test_bench_multirun(tmp_path):
    proc = run_bench(tmp_path, "-m", *TINY, "bench.storages=[memmap]", "bench.batch_sizes=[16],[32]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "outputs" / "bench-multirun").glob("*/*/*/results.csv"))) == 2
