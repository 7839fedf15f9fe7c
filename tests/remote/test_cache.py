"""The object cache: verified, atomic, bounded, shared by real processes, surviving an outage."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.data.remote.cache import ObjectCache
from pipeline.data.remote.errors import CacheError, CorruptObject
from pipeline.data.remote.retry import RetryPolicy
from pipeline.data.remote.store import MIB, ObjectStore, sha256_file


def _objects(s3, n: int, size: int, seed: int = 0) -> list[tuple[str, int, str]]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        data = rng.randbytes(size + rng.randrange(size // 4))
        key = f"ex/shard-{i:05d}.npy"
        s3.raw.put_object(Bucket=s3.bucket, Key=key, Body=data)
        items.append((key, len(data), hashlib.sha256(data).hexdigest()))
    return items


def test_fetch_downloads_once_then_hits_and_evicts_released_objects(s3, tmp_path):
    items = _objects(s3, 4, 256 * 1024)
    limit = items[0][1] + items[1][1] + items[2][1]
    with ObjectCache(s3.store, tmp_path / "c", limit) as cache:
        p = cache.fetch(*items[0])
        assert sha256_file(p) == items[0][2]
        assert cache.fetch(*items[0]) == p  # already pinned here: no second download
        cache.release(items[0][0])
        assert cache.fetch(*items[0]) == p
        s = cache.stats()
        assert (s.misses, s.hits, s.remote_bytes) == (1, 1, items[0][1])
        for item in items:
            cache.fetch(*item)
            cache.release(item[0])
        assert cache.cached_bytes() <= limit  # the least recently released went first
        assert not (tmp_path / "c" / "objects" / cache.name_of(items[0][0], items[0][2])).exists()
        assert cache.stats().hit_fraction == pytest.approx(1 / 5)  # 1 hit, 4 downloads
        assert not list((tmp_path / "c" / "partial").iterdir())


def test_prefetch_gives_the_same_files_as_serial_fetches(s3, tmp_path):
    items = _objects(s3, 6, 128 * 1024, seed=1)
    with ObjectCache(s3.store, tmp_path / "a", 10 * MIB) as serial:
        one = [sha256_file(serial.fetch(*it)) for it in items]
    with ObjectCache(s3.store, tmp_path / "b", 10 * MIB, threads=4) as parallel:
        parallel.prefetch(items)
        two = [sha256_file(parallel.fetch(*it)) for it in items]
        assert parallel.stats().misses == 6
    assert one == two == [it[2] for it in items]


def test_a_corrupted_object_is_fetched_again_then_fails_naming_it(s3, tmp_path, caplog):
    ((key, size, digest),) = _objects(s3, 1, 64 * 1024)
    s3.raw.put_object(Bucket=s3.bucket, Key=key, Body=os.urandom(size))  # damaged behind the export's back
    with ObjectCache(s3.store, tmp_path / "c", 10 * MIB) as cache:
        with caplog.at_level(logging.WARNING), pytest.raises(CorruptObject, match=f"s3://{s3.bucket}/{key}"):
            cache.fetch(key, size, digest)
        assert cache.stats().refetches == 2 and cache.stats().remote_bytes == 2 * size
        assert "fetching it again" in caplog.text
        assert cache.cached_bytes() == 0  # nothing unverified is kept
        s3.raw.put_object(Bucket=s3.bucket, Key=key, Body=b"short")  # the size is wrong too
        with pytest.raises(CorruptObject, match=f"{key}.*5 bytes, {size} were expected"):
            cache.fetch(key, size, digest)


def test_a_limit_below_one_object_holds_one_at_a_time_and_never_deadlocks(s3, tmp_path, caplog):
    items = _objects(s3, 3, 128 * 1024, seed=2)
    with ObjectCache(s3.store, tmp_path / "c", 1000) as cache, caplog.at_level(logging.WARNING):
        first = cache.fetch(*items[0])
        with pytest.raises(CacheError, match="Release consumed objects before fetching more"):
            cache.fetch(*items[1])  # this process pins the only object the limit allows
        assert first.exists()
        cache.release(items[0][0])
        cache.prefetch(items[1:])  # one waits for room while the other is read
        for it in items[1:]:
            assert sha256_file(cache.fetch(*it)) == it[2]
            assert cache.cached_bytes() <= 1000 + max(i[1] for i in items)
            cache.release(it[0])
    assert caplog.text.count("holds one object at a time") == 1


@pytest.mark.slow
def test_an_outage_of_seconds_mid_fetch_is_survived(s3, tmp_path):
    items = _objects(s3, 4, 3 * MIB, seed=3)
    store = ObjectStore(s3.bucket, retry=RetryPolicy(give_up_after_s=20, cap_s=1.0))
    with ObjectCache(store, tmp_path / "c", 8 * MIB, part_size=1 * MIB, download_threads=2) as cache:
        s3.proxy.outage(4.0, after_bytes=5 * MIB)  # mid-way through the second object, for 4 s
        cache.prefetch(items[1:3])
        for it in items:
            assert sha256_file(cache.fetch(*it)) == it[2]
            cache.release(it[0])
        assert s3.proxy.connections > 4 and cache.stats().misses == 4


# --- several processes -------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[2]


def _readers(s3, folder, limit, items, prefetch: bool, n: int = 3) -> list[dict]:
    """``n`` real processes (tests/remote/cache_reader.py) reading every object through one cache."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.remote.cache_reader",
                json.dumps(
                    dict(
                        bucket=s3.bucket,
                        folder=str(folder),
                        limit=limit,
                        items=items,
                        seed=seed,
                        prefetch=prefetch,
                    )
                ),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in range(n)
    ]
    out = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * n
    return [json.loads(o.strip().splitlines()[-1]) for o in out]


def _watch(cache: ObjectCache, stop: threading.Event, peaks: list) -> None:
    while not stop.is_set():
        peaks.append(cache.cached_bytes())
        time.sleep(0.002)


@pytest.mark.parametrize("limit_objects", [2.5, pytest.param(100, marks=pytest.mark.slow)])
def test_processes_share_one_cache_within_its_limit(s3, tmp_path, limit_objects):
    items = _objects(s3, 8, 96 * 1024, seed=4)
    biggest = max(it[1] for it in items)
    limit = int(limit_objects * 96 * 1024)
    folder = tmp_path / "shared"
    watcher = ObjectCache(s3.store, folder, limit)
    stop, peaks = threading.Event(), []
    t = threading.Thread(target=_watch, args=(watcher, stop, peaks))
    t.start()
    try:
        results = _readers(s3, folder, limit, items, prefetch=limit_objects < 10)
    finally:
        stop.set()
        t.join()
    assert all(r["ok"] for r in results)  # every process read the right bytes
    assert max(peaks) <= limit + biggest
    misses, hits = sum(r["misses"] for r in results), sum(r["hits"] for r in results)
    assert misses + hits == 3 * len(items)  # each fetch counted once
    if limit_objects >= 10:  # room for everything: each object downloaded once, by one process
        assert (misses, hits) == (len(items), 2 * len(items))
    assert not list((folder / "partial").iterdir())


def test_a_cache_filled_before_a_restart_starts_empty(s3, tmp_path):
    items = _objects(s3, 2, 64 * 1024, seed=5)
    with ObjectCache(s3.store, tmp_path / "c", 10 * MIB) as cache:
        for it in items:
            cache.fetch(*it)
            cache.release(it[0])
    with ObjectCache(s3.store, tmp_path / "c", 10 * MIB) as cache:  # same boot: kept
        assert cache.cached_bytes() == sum(it[1] for it in items)
    (tmp_path / "c" / "boot_id").write_text("another-boot")  # as after a reboot (maybe a power cut)
    with ObjectCache(s3.store, tmp_path / "c", 10 * MIB) as cache:
        assert cache.cached_bytes() == 0  # unsynced pages may have been lost: nothing is trusted
        assert sha256_file(cache.fetch(*items[0])) == items[0][2]


def test_a_prefetch_never_evicts_an_object_prefetched_and_not_yet_read(s3, tmp_path):
    """Prefetched B is older than consumed A; making room for D evicts A, not B (B would be downloaded
    twice), and B is then read without a second download."""
    a, b, c, d = _objects(s3, 4, 128 * 1024, seed=3)
    limit = 3 * max(it[1] for it in (a, b, c, d))
    with ObjectCache(s3.store, tmp_path / "c", limit, threads=1) as cache:
        objects = tmp_path / "c" / "objects"

        def arrived(item, timeout=20.0) -> bool:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if (objects / cache.name_of(item[0], item[2])).exists():
                    return True
                time.sleep(0.01)
            return False

        cache.fetch(*a)
        cache.prefetch([b])
        assert arrived(b)
        time.sleep(0.05)  # A's release is then newer than B's download: plain LRU would evict B first
        cache.release(a[0])
        cache.prefetch([c, d])
        assert arrived(c) and arrived(d)
        assert not (objects / cache.name_of(a[0], a[2])).exists()  # the consumed object made the room
        assert sha256_file(cache.fetch(*b)) == b[2]
        assert cache.stats().remote_bytes == sum(it[1] for it in (a, b, c, d))  # nothing downloaded twice
        assert cache.cached_bytes() <= limit
