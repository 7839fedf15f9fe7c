"""Shards: fixed-size shard files with an index, and the block shuffle's guarantees."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.storage.batching import RandomBatchSampler, shuffle_quality
from pipeline.data.storage.shards import BlockShuffleBatchSampler, samples_per_shard
from tests.test_storage_formats import random_data, write_format


def epoch(sampler) -> np.ndarray:
    return np.concatenate(list(sampler))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    per_shard=st.integers(1, 50),
    buffer=st.integers(1, 5),
    batch=st.integers(1, 40),
    seed=st.integers(0, 2**31),
)
def test_block_shuffle_visits_every_sample_once(n, per_shard, buffer, batch, seed):
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(n * 2, size=n, replace=False))  # a train split: a subset of the samples
    sampler = BlockShuffleBatchSampler(ids // per_shard, buffer, batch, True, False, seed)
    for _ in range(2):  # every epoch
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(len(b) == batch for b in batches[:-1])
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(n))


def test_block_shuffle_drop_last_and_no_shuffle():
    shard_of = np.arange(100) // 10
    s = BlockShuffleBatchSampler(shard_of, 2, 32, True, True, 0)
    assert len(s) == 3 and [len(b) for b in s] == [32, 32, 32]
    s = BlockShuffleBatchSampler(shard_of, 2, 32, False, False)
    np.testing.assert_array_equal(epoch(s), np.arange(100))


def test_block_shuffle_seeded_and_reads_few_shards_at_a_time():
    shard_of = np.arange(1000) // 50  # 20 shards
    order = {}
    for seed in (0, 0, 1):
        order.setdefault(seed, []).append(epoch(BlockShuffleBatchSampler(shard_of, 2, 25, True, False, seed)))
    np.testing.assert_array_equal(order[0][0], order[0][1])  # same seed, same order
    assert not np.array_equal(order[0][0], order[1][0])  # different seed, different order
    s = BlockShuffleBatchSampler(shard_of, 2, 25, True, False, 0)
    first, second = epoch(s), epoch(s)
    assert not np.array_equal(first, second)  # a new order each epoch
    # each run of 100 consecutive samples (one buffer) comes from at most 2 shards
    for start in range(0, 1000, 100):
        assert len(np.unique(shard_of[first[start : start + 100]])) <= 2
    # every batch is sorted, so it costs one read per shard it touches
    assert all(np.all(np.diff(b) >= 0) for b in s)


def test_shuffle_quality_figure():
    n = 10_000
    assert shuffle_quality(np.arange(n)) < 0.001
    full = RandomBatchSampler(n, 64, True, False).epoch_order(0)
    assert 0.95 < shuffle_quality(full) < 1.05
    small = BlockShuffleBatchSampler(np.arange(n) // 100, 1, 64, True, False).epoch_order(0)
    big = BlockShuffleBatchSampler(np.arange(n) // 100, 50, 64, True, False).epoch_order(0)
    assert shuffle_quality(small) < shuffle_quality(big) < 1.05


def test_shard_files_and_index(tmp_path):
    x, y = random_data(np.random.default_rng(0), 45, (16, 16), "float32")  # 1 KiB per sample
    spec, cfg = write_format(
        tmp_path / "e", "shards", x, y, chunk=13, cfg={"name": "shards", "shard_size_mb": 10 / 1024}
    )
    assert samples_per_shard(10 / 1024, spec.sample_bytes) == 10
    index = json.loads((tmp_path / "e" / "shards" / "index.json").read_text())
    assert index["samples_per_shard"] == 10
    assert [s["count"] for s in index["shards"]] == [10, 10, 10, 10, 5]
    for s in index["shards"]:
        arr = np.load(tmp_path / "e" / "shards" / s["file"], allow_pickle=False)
        np.testing.assert_array_equal(arr, x[s["start"] : s["start"] + s["count"]])


@pytest.mark.parametrize("bad", [0, -1.5])
def test_bad_shard_size_is_rejected(tmp_path, bad):
    from pipeline.config.validate import ConfigError, validate
    from tests.conftest import compose_cfg

    cfg = compose_cfg(tmp_path, ["storage=shards", f"storage.shard_size_mb={bad}"])
    with pytest.raises(ConfigError, match="storage.shard_size_mb"):
        validate(cfg)
    cfg = compose_cfg(tmp_path, ["storage=shards", "storage.shuffle_buffer_shards=0"])
    with pytest.raises(ConfigError, match="storage.shuffle_buffer_shards"):
        validate(cfg)


def test_buffer_is_a_read_option_not_a_new_export(tmp_path):
    from pipeline.data.export import export_name
    from tests.conftest import compose_cfg

    a = compose_cfg(tmp_path, ["source=synthetic", "storage=shards", "storage.shuffle_buffer_shards=1"])
    b = compose_cfg(tmp_path, ["source=synthetic", "storage=shards", "storage.shuffle_buffer_shards=8"])
    c = compose_cfg(tmp_path, ["source=synthetic", "storage=shards", "storage.shard_size_mb=8"])
    assert export_name(a.source, a.storage) == export_name(b.source, b.storage)
    assert export_name(a.source, a.storage) != export_name(c.source, c.storage)
