"""Training reads its data from disk and says how much: io/* per epoch; real out-of-core runs in a cgroup."""

from __future__ import annotations

import shutil

import pytest

from pipeline.data.export import export
from pipeline.system.cgroups import CgroupUnavailable, MemoryCgroup
from pipeline.system.page_cache import drop
from tests.conftest import compose_cfg, run_cli
from tests.run_helpers import histories, run_id_for

SAMPLE_BYTES = 62 * 47 * 4  # LFW-shaped float32
MiB = 2**20


def _export_cold(root, overrides):
    """Export in this process (outside any cgroup), then drop the export's pages: the job starts cold."""
    cfg = compose_cfg(root, overrides)
    exp = export(cfg.source, cfg.storage, cfg.paths.data_dir)
    drop(exp.root, method="fadvise")  # this export only: the rest of the machine keeps its cache
    return exp


def test_every_epoch_records_its_disk_reads_workers_included(tmp_path):
    from pipeline.job import run

    overrides = [
        "source=synthetic",
        "source.num_samples=3000",  # 35 MB
        "storage=npy",  # a file per sample: the few the job reads for its plot do not read ahead the rest
        "loader.num_workers=1",  # the worker reads, then exits at the end of each epoch
        "loader.batch_size=256",
        "model.hidden=[32]",
        "trainer.epochs=2",
        "tracking.log_model=false",
    ]
    _export_cold(tmp_path, overrides)
    run(compose_cfg(tmp_path, overrides))
    h = histories(
        tmp_path,
        run_id_for(tmp_path, tmp_path / "run"),
        ("io/read_mb", "io/read_mb_per_s", "io/read_amplification"),
    )
    assert [s for s, _ in h["io/read_mb"]] == [0, 1] and len(h["io/read_amplification"]) == 2
    (_, first_mb), (_, first_rate), (_, first_amp) = (
        h["io/read_mb"][0],
        h["io/read_mb_per_s"][0],
        h["io/read_amplification"][0],
    )
    train_mb = 2400 * SAMPLE_BYTES / 1e6
    # the cold first epoch fetched its samples from disk, through the worker (readahead may add the val rows)
    assert 0.9 <= first_amp <= 2.0 and first_mb == pytest.approx(first_amp * train_mb, rel=1e-6)
    assert first_rate > 0
    assert all(v >= 0 for _, v in h["io/read_mb"])


# ---- out of core for real (slow): the whole job in a memory cgroup, data twice its limit ----

# Above what the job itself holds, so that the data is what does not fit: ~400 MB anonymous while it trains
# (torch, MLflow), ~650 MB at its end (plots); 640 MB was OOM-killed there.
LIMIT_MB = 800
NUM_SAMPLES = 2 * LIMIT_MB * MiB // SAMPLE_BYTES + 1000  # 144,920 samples, 1.69 GB: over twice the limit
OOC_COMMON = [
    "source=synthetic",
    f"source.num_samples={NUM_SAMPLES}",
    "source.num_classes=10",
    "split.stratify=false",
    "model=mlp",
    "model.hidden=[64]",
    "loader.batch_size=256",
    "trainer.epochs=1",
    "trainer.checkpoint=false",
    "tracking.log_model=false",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "storage",
    [["storage=memmap"], ["storage=shards", "storage.shard_size_mb=16", "storage.shuffle_buffer_shards=4"]],
    ids=["memmap", "shards"],
)
def test_trains_on_data_twice_the_memory_limit(tmp_path, storage):
    overrides = [*OOC_COMMON, *storage]
    exp = _export_cold(tmp_path, overrides)
    assert exp.spec.num_samples * exp.spec.sample_bytes >= 2 * LIMIT_MB * MiB
    cg = MemoryCgroup(LIMIT_MB * MiB, prefix="pipeline-test")
    try:
        try:
            cg.__enter__()  # this process moves in, so the job it starts runs inside from its first byte
        except CgroupUnavailable as err:
            pytest.skip(f"no memory cgroup here: {err}")
        try:
            proc = run_cli(tmp_path, *overrides, "paths.output_dir=" + str(tmp_path / "run"), timeout=600)
        finally:
            cg.__exit__(None, None, None)
        keys = ("train/samples_seen", "io/read_mb", "io/read_amplification", "perf/train_samples_per_s",
                "perf/data_wait_fraction")  # fmt: skip
        try:  # the epoch's metrics are logged when it ends, even if the job dies afterwards
            runs = histories(tmp_path, run_id_for(tmp_path, tmp_path / "run"), keys)
            h = {k: v[-1][1] for k, v in runs.items() if v}
        except Exception:  # no run recorded
            h = {}
        seen = (
            f"{storage[0]}: read {h['io/read_mb']:,.0f} MB from disk = {h['io/read_amplification']:.2f}x the "
            f"samples, {h['perf/train_samples_per_s']:,.0f} samples/s, {h['perf/data_wait_fraction']:.0%} "
            "waiting for data"
            if "io/read_amplification" in h
            else f"{storage[0]}: no epoch ended"
        ) + f"; cgroup peak {cg.peak_mb:.0f} MB of {LIMIT_MB} MB, {cg.oom_kills} OOM kills"
        print(seen)  # the figures, for the log (pytest -s)
        assert cg.oom_kills == 0, seen
        assert proc.returncode == 0, seen + "\n" + proc.stderr[-3000:]
        assert h["train/samples_seen"] == int(NUM_SAMPLES * 0.8), seen
        assert h["io/read_amplification"] <= 1.5, seen
    finally:
        shutil.rmtree(exp.root, ignore_errors=True)  # 1.69 GB
