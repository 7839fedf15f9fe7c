"""Whole jobs with ``paths.data_dir=s3://...`` on a real S3-compatible server (moto, behind a fault proxy):
the export is published to the bucket and reused by the next job; training streams the shards through a
local cache smaller than the data -- across an outage of the server -- with exact counts; a missing bucket
and a corrupted shard fail the run, naming them."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import fsio
from tests.conftest import compose_cfg, sqlite_uri

SHARD_MB = 0.25
LIMIT_MB = 0.6  # the data is about 3 MB: the cache holds two shards at most (plus the one being admitted)


def _overrides(s3, *extra: str) -> list[str]:
    return [
        "source=synthetic",
        "source.num_samples=3000",
        "source.shape=[16,16]",  # 1 KiB a sample: 3 MB in ~12 shards
        "storage=shards",
        f"storage.shard_size_mb={SHARD_MB}",
        "storage.shuffle_buffer_shards=2",
        f"storage.cache_limit_mb={LIMIT_MB}",
        f"paths.data_dir={s3.url('exports')}",
        "trainer.epochs=2",
        "tracking.log_model=false",
        *extra,
    ]


def _runs(root: Path):
    client = MlflowClient(sqlite_uri(root))
    exp = client.get_experiment_by_name("pipeline")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


class CacheWatch:
    """Samples the bytes in the shard cache every few milliseconds (objects + admitted downloads), under
    the cache's own lock, as ``ObjectCache.cached_bytes`` does: an eviction and the admission it made room
    for happen together under it, and a scan outside it could count the evicted object and the new download
    both."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.peak, self.stop = folder, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            total = 0
            if (self.folder / "cache.lock").exists():
                with fsio.locked(self.folder / "cache.lock"):
                    for sub in ("objects", "partial"):
                        for f in (self.folder / sub).glob("*") if (self.folder / sub).is_dir() else ():
                            try:
                                total += f.stat().st_size
                            except FileNotFoundError:
                                pass
            self.peak = max(self.peak, total)
            time.sleep(0.003)

    def __enter__(self) -> CacheWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


@pytest.mark.slow  # ~25 s: two jobs, a 4 s outage
def test_a_job_exports_to_a_bucket_and_trains_through_a_small_cache_across_an_outage(s3, tmp_path):
    from pipeline.job import run

    cache = tmp_path / "outputs" / "cache" / "shards"
    started = threading.Event()

    def outage_once_training() -> None:  # the server unreachable for 4 s once shards are being fetched
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (cache / "objects").is_dir():
            time.sleep(0.02)
        while time.monotonic() < deadline and len(list((cache / "objects").glob("*"))) < 2:
            time.sleep(0.01)
        started.set()
        s3.proxy.outage(4)

    threading.Thread(target=outage_once_training, daemon=True).start()
    with CacheWatch(cache) as watch:
        final = run(compose_cfg(tmp_path, _overrides(s3, "loader.num_workers=2")))
    assert started.is_set()
    client, (first,) = _runs(tmp_path)
    assert first.info.status == "FINISHED"
    assert final["train/samples_seen"] == 2 * 2400  # exact, both epochs, across the outage
    shard = max(o["Size"] for o in s3.raw.list_objects_v2(Bucket=s3.bucket)["Contents"])
    assert watch.peak <= LIMIT_MB * 1e6 + shard, (watch.peak, shard)
    history = client.get_metric_history(first.info.run_id, "io/remote_mb")
    assert sum(m.value for m in history) > 2 * 2.4  # every epoch streamed more than the cache holds
    assert first.data.tags["data.dir"].startswith(s3.url("exports", "synthetic-shards-"))
    assert first.data.tags["data.reused"] == "false"
    inputs = client.get_run(first.info.run_id).inputs.dataset_inputs
    assert all(i.dataset.source_type == "s3" and s3.url("exports") in i.dataset.source for i in inputs)
    assert not list((tmp_path / "outputs" / "cache" / "staging").glob("synthetic-*"))  # published, removed

    second = run(compose_cfg(tmp_path, _overrides(s3, "trainer.epochs=1")))
    client, (_, again) = _runs(tmp_path)
    assert again.data.tags["data.reused"] == "true" and second["train/samples_seen"] == 2400


def test_a_missing_bucket_fails_the_run_naming_it(s3, tmp_path):
    from pipeline.data.remote.errors import BucketNotFound
    from pipeline.job import run

    overrides = _overrides(s3)
    overrides[overrides.index(f"paths.data_dir={s3.url('exports')}")] = (
        "paths.data_dir=s3://no-such-bucket-x/e"
    )
    with pytest.raises(BucketNotFound, match="no-such-bucket-x"):
        run(compose_cfg(tmp_path, overrides))
    _, (r,) = _runs(tmp_path)
    assert r.info.status == "FAILED" and "no-such-bucket-x" in r.data.tags["error"]
    assert not (tmp_path / "outputs" / "cache" / "staging").exists()  # failed before any data work


def test_a_corrupted_shard_in_the_bucket_is_named_and_the_run_fails(s3, tmp_path):
    import shutil

    from pipeline.data.remote.errors import CorruptObject
    from pipeline.job import run

    run(compose_cfg(tmp_path, _overrides(s3, "trainer.epochs=1")))
    listing = s3.raw.list_objects_v2(Bucket=s3.bucket)["Contents"]
    victim = next(o["Key"] for o in listing if o["Key"].endswith("shard-00003.npy"))
    body = s3.raw.get_object(Bucket=s3.bucket, Key=victim)["Body"].read()
    s3.raw.put_object(Bucket=s3.bucket, Key=victim, Body=body[:-8] + b"\x00" * 8)  # same size, other bytes
    shutil.rmtree(tmp_path / "outputs" / "cache" / "shards")  # not cached: it must come from the bucket
    with pytest.raises(CorruptObject, match="shard-00003.npy"):
        run(compose_cfg(tmp_path, _overrides(s3, "trainer.epochs=1")))
    _, (_, r) = _runs(tmp_path)
    assert r.info.status == "FAILED" and "shard-00003.npy" in r.data.tags["error"]
