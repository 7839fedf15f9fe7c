"""Shards: fixed-size shard files with an index, and the block shuffle's guarantees."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.sampling import BlockShuffleBatchSampler, RandomBatchSampler, shuffle_quality
from pipeline.data.storage.shards import samples_per_shard
from tests.test_storage_formats import random_data, write_format


def epoch(sampler) -> np.ndarray:
    return np.concatenate([b.positions for b in sampler])


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
    assert index["layout"] == 2 and index["placement"]["seed"] == 0
    placed = np.load(tmp_path / "e" / "shards" / index["placement"]["file"], allow_pickle=False)
    np.testing.assert_array_equal(np.sort(placed), np.arange(45))  # a permutation of the ids...
    assert not np.array_equal(placed, np.arange(45))  # ...not the identity
    for k, s in enumerate(index["shards"]):
        arr = np.load(tmp_path / "e" / "shards" / s["file"], allow_pickle=False)
        np.testing.assert_array_equal(arr, x[placed[10 * k : 10 * k + s["count"]]])


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


# ---- the reader: buffers read by the sampler, records carried to __getitems__ ----


def _export(tmp_path, n=300, shape=(6, 5), shard_kb=2, buffer_shards=2, buffers="auto"):
    """A shards export of ``n`` samples (``shard_kb`` KiB shards) and its Dataset over a random 80% split."""
    from pipeline.data.storage.shards import Dataset

    rng = np.random.default_rng(5)
    x, y = random_data(rng, n, shape, "float32")
    cfg = {"name": "shards", "shard_size_mb": shard_kb / 1024, "shuffle_buffer_shards": buffer_shards}
    spec, scfg = write_format(tmp_path / "e", "shards", x, y, chunk=17, cfg={**cfg, "buffers": buffers})
    ids = np.sort(rng.choice(n, size=int(n * 0.8), replace=False))
    return Dataset(tmp_path / "e", spec, y, ids, scfg), x, y, ids


def _batches(ds, sampler):
    """(positions, x, y) of every batch of one pass, through ``__getitems__`` as the loader does."""
    out = []
    for batch in sampler:
        bx, by = ds.__getitems__(batch)
        out.append((np.asarray(list(batch)), bx.numpy(), by.numpy()))
    return out


@pytest.mark.parametrize("buffers", ["memory", "mapped"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shard_batches_carry_their_records_and_visit_every_sample_once(tmp_path, buffers, drop_last):
    ds, x, y, ids = _export(tmp_path, buffers=buffers)
    assert ds.buffers == buffers and len(ds.files) > 4
    sampler = ds.batch_sampler(32, shuffle=True, drop_last=drop_last, seed=3)
    plain = BlockShuffleBatchSampler(ds.shard_of, 2, 32, True, drop_last, 3, local=ds.local)
    epochs = [_batches(ds, sampler) for _ in range(2)]
    for e, batches in enumerate(epochs):
        positions = np.concatenate([p for p, _, _ in batches])
        assert len(batches) == len(sampler)
        assert [len(p) for p, _, _ in batches[:-1]] == [32] * (len(batches) - 1)
        want = len(ids) - len(ids) % 32 if drop_last else len(ids)
        assert len(positions) == want and len(set(positions.tolist())) == want  # each sample at most once
        for p, bx, by in batches:
            np.testing.assert_array_equal(bx, x[ids[p]])  # the records are those samples'
            np.testing.assert_array_equal(by, y[ids[p]])
        np.testing.assert_array_equal(positions, np.concatenate(list(plain)))  # the order: (seed, epoch)
    assert not np.array_equal(epochs[0][0][0], epochs[1][0][0])  # a new order each epoch
    sampler.set_epoch(1)
    np.testing.assert_array_equal(_batches(ds, sampler)[3][1], epochs[1][3][1])  # replayed
    unshuffled = _batches(ds, ds.batch_sampler(50, shuffle=False, drop_last=False, seed=0))
    np.testing.assert_array_equal(np.sort(np.concatenate([p for p, _, _ in unshuffled])), np.arange(len(ids)))


def _loader_batches(tmp_path, ds, **loader):
    import torch

    from pipeline.training.loading import build_loader
    from tests.conftest import compose_cfg

    overrides = [f"loader.{k}={v}" for k, v in {"batch_size": 16, **loader}.items()]
    cfg = compose_cfg(tmp_path, overrides)
    built = build_loader(ds, cfg.loader, seed=4, train=True, device=torch.device("cpu"))
    return [[(bx.numpy(), by.numpy()) for bx, by in built] for _ in range(2)]


@pytest.mark.parametrize("buffers", ["memory", "mapped"])
def test_same_batches_for_0_or_2_workers_and_with_thread_prefetch(tmp_path, buffers):
    ds, x, y, ids = _export(tmp_path, buffers=buffers)
    ref = _loader_batches(tmp_path, ds)
    for loader in (
        dict(num_workers=2),
        dict(num_workers=2, persistent_workers=True),
        dict(thread_prefetch=3),
    ):
        got = _loader_batches(tmp_path, ds, **loader)
        assert len(got) == len(ref)
        for epoch_ref, epoch_got in zip(ref, got):
            assert len(epoch_ref) == len(epoch_got)
            for (rx, ry), (gx, gy) in zip(epoch_ref, epoch_got):
                np.testing.assert_array_equal(rx, gx)
                np.testing.assert_array_equal(ry, gy)


def test_ranks_read_disjoint_parts_of_every_shard(tmp_path):
    """Under torchrun each rank reads its own slice of every shard: together every sample once, no byte read
    by two ranks, sample counts within one per shard."""
    ds, x, y, ids = _export(tmp_path, buffers="memory")
    sampler = ds.batch_sampler(10, shuffle=True, drop_last=False, seed=1)
    seen, spans = [], []
    for rank in range(3):
        mine = sampler.for_rank(rank, 3)
        batches = _batches(ds, mine)
        positions = np.concatenate([p for p, _, _ in batches])
        assert len(positions) == mine.num_samples and len(batches) == len(mine)
        for p, bx, _ in batches:
            np.testing.assert_array_equal(bx, x[ids[p]])
        seen.append(positions)
        ranges = mine.stream.plan(ds.shard_of[positions], ds.local[positions])[0]
        spans.append({(f, b) for f, lo, hi, _, _ in ranges for b in range(lo, hi)})
    assert sorted(np.concatenate(seen).tolist()) == list(range(len(ids)))
    assert not (spans[0] & spans[1]) and not (spans[1] & spans[2]) and not (spans[0] & spans[2])
    assert max(map(len, seen)) - min(map(len, seen)) <= len(ds.files)


def test_direct_reads_match_the_buffered_ones(tmp_path):
    ds, x, y, ids = _export(tmp_path, buffers="mapped")
    idx = np.array([5, 0, 200, 5, 17])  # any order, repeats
    bx, by = ds.__getitems__(idx)
    np.testing.assert_array_equal(bx.numpy(), x[ids[idx]])
    np.testing.assert_array_equal(by.numpy(), y[ids[idx]])
    xi, yi = ds[7]
    np.testing.assert_array_equal(xi.numpy(), x[ids[7]])
    assert yi == y[ids[7]]


def test_damaged_shards_fail_naming_the_file(tmp_path):
    import os

    from pipeline.data.integrity import IntegrityError
    from pipeline.data.storage.shards import Dataset

    ds, x, y, ids = _export(tmp_path)
    folder, spec = tmp_path / "e" / "shards", ds.spec
    shard = folder / "shard-00003.npy"
    size = shard.stat().st_size
    os.truncate(shard, size - 7)
    with pytest.raises(IntegrityError, match="shard-00003.npy"):
        Dataset(tmp_path / "e", spec, y, ids)
    os.truncate(shard, size)
    data = shard.read_bytes()
    shard.write_bytes(data[:8] + b"{'descr': garbage" + data[25:])  # a corrupted header
    with pytest.raises(IntegrityError, match="shard-00003.npy"):
        Dataset(tmp_path / "e", spec, y, ids)
    shard.write_bytes(data)
    ds = Dataset(tmp_path / "e", spec, y, ids, {"buffers": "memory"})
    os.truncate(shard, size // 2)  # after the check: the read names it
    with pytest.raises(IntegrityError, match="shard-00003.npy.*truncated"):
        _batches(ds, ds.batch_sampler(16, True, False, 0))
    os.truncate(shard, size)
    index = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps({**index, "layout": 1}))
    with pytest.raises(IntegrityError, match="layout 1"):
        Dataset(tmp_path / "e", spec, y, ids)
    (folder / "index.json").write_text(json.dumps(index))
    np.save(folder / "placement.npy", np.zeros(len(x), dtype=np.int64))
    with pytest.raises(IntegrityError, match="placement.npy is not a permutation"):
        Dataset(tmp_path / "e", spec, y, ids)


def test_shards_mix_a_class_sorted_source(tmp_path):
    """An image folder lists its samples class by class; placed in a seeded permutation, a buffer of two
    shards still gives batches with >= 0.9x the distinct classes of a full shuffle (without it: ~2 of 12)."""
    from PIL import Image

    from pipeline.data.export import export
    from pipeline.data.partition import partition
    from pipeline.training.loading import build_loader
    from tests.conftest import compose_cfg

    rng = np.random.default_rng(0)
    for c in range(12):
        (tmp_path / "imgs" / f"class{c:02d}").mkdir(parents=True)
        for i in range(25):
            pixels = rng.integers(0, 255, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / f"class{c:02d}" / f"{i:02d}.png")
    cfg = compose_cfg(
        tmp_path,
        [
            "source=image_folder",
            f"source.root={tmp_path / 'imgs'}",
            "source.size=[8,8]",
            "storage=shards",
            "storage.shard_size_mb=0.0016",  # 26 samples of 64 bytes per shard
            "storage.shuffle_buffer_shards=2",
            "loader.batch_size=16",
        ],
    )
    exp = export(cfg.source, cfg.storage, tmp_path / "data")
    assert (np.diff(exp.labels) >= 0).all()  # the source is sorted by class
    split = partition(exp.labels, cfg.split)
    ds = exp.dataset(split.train, cfg.storage)
    loader = build_loader(ds, cfg.loader, seed=0, train=True, device=__import__("torch").device("cpu"))
    distinct = np.mean([len(np.unique(y.numpy())) for _ in range(3) for _, y in loader])
    labels = exp.labels[split.train]
    full = np.mean(
        [
            len(np.unique(labels[b]))
            for seed in range(3)
            for b in RandomBatchSampler(len(labels), 16, True, False, seed)
        ]
    )
    assert distinct >= 0.9 * full, (distinct, full)
