"""Every storage format round-trips exactly; batched and per-item reads agree; workers open their own maps."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, get_worker_info

from pipeline.data.sources import SampleSpec
from pipeline.data.storage import formats, get_format
from pipeline.training.loading import build_loader
from tests.conftest import compose_cfg

STORAGE_CFG = {
    "pt": {"name": "pt"},
    "npy": {"name": "npy"},
    "memmap": {"name": "memmap"},
    "ram": {"name": "ram"},
    "shards": {"name": "shards", "shard_size_mb": 0.001, "shuffle_buffer_shards": 2},
    "encoded": {"name": "encoded", "codec": "png", "shard_size_mb": 0.001, "shuffle_buffer_shards": 2},
}
IMAGES_ONLY = {"encoded"}  # 8-bit images only: its own round trips are in tests/test_encoded.py
DTYPES = ["float32", "float64", "float16", "uint8", "int16", "int64"]


def write_format(root, name, x, y, chunk=7, cfg=None):
    spec = SampleSpec(len(x), tuple(x.shape[1:]), str(x.dtype), int(y.max()) + 1, ())
    cfg = OmegaConf.create(cfg or STORAGE_CFG[name])
    root.mkdir(parents=True)
    writer = get_format(name).writer(root, spec, cfg)
    for start in range(0, len(x), chunk):
        writer.write(x[start : start + chunk], y[start : start + chunk])
    writer.close()
    return spec, cfg


def random_data(rng, n, shape, dtype):
    if np.dtype(dtype).kind == "f":
        x = rng.standard_normal((n, *shape)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, size=(n, *shape), dtype=dtype, endpoint=True)
    return x, rng.integers(0, 5, size=n).astype(np.int64)


def test_every_format_is_tested():
    """Every format of the package (formats registered by a test, e.g. tests/test_contracts.py, aside)."""
    assert set(STORAGE_CFG) >= {n for n, f in formats().items() if type(f).__module__.startswith("pipeline.")}


@pytest.mark.parametrize("name", sorted(set(STORAGE_CFG) - IMAGES_ONLY))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 40),
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),  # sources give >= 1 dimension
    dtype=st.sampled_from(DTYPES),
    chunk=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_round_trip_exact(tmp_path_factory, name, n, shape, dtype, chunk, seed):
    rng = np.random.default_rng(seed)
    x, y = random_data(rng, n, tuple(shape), dtype)
    root = tmp_path_factory.mktemp(name) / "export"
    spec, cfg = write_format(root, name, x, y, chunk=chunk)
    ids = np.sort(rng.choice(n, size=max(1, n // 2), replace=False))
    ds = get_format(name).dataset(root, spec, y, ids, cfg)
    assert len(ds) == len(ids)
    for i, sid in enumerate(ids):
        xi, yi = ds[i]
        assert isinstance(xi, torch.Tensor) and xi.dtype == torch.from_numpy(x[:1]).dtype
        np.testing.assert_array_equal(xi.numpy(), x[sid])
        assert yi == y[sid]


@pytest.mark.parametrize("name", ["memmap", "shards", "encoded"])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), k=st.integers(1, 30))
def test_batched_equals_per_item(tmp_path_factory, name, seed, k):
    rng = np.random.default_rng(seed)
    x, y = random_data(rng, 53, (3, 4), "uint8" if name in IMAGES_ONLY else "float32")
    root = tmp_path_factory.mktemp(name) / "export"
    spec, cfg = write_format(root, name, x, y)
    ids = np.sort(rng.choice(53, size=40, replace=False))
    ds = get_format(name).dataset(root, spec, y, ids, cfg)
    idx = rng.choice(40, size=k, replace=bool(seed % 2))  # any order, repeats allowed
    bx, by = ds.collate_fn(ds.__getitems__(idx))
    items = [ds[int(i)] for i in idx]
    np.testing.assert_array_equal(bx.numpy(), np.stack([xi.numpy() for xi, _ in items]))
    np.testing.assert_array_equal(by.numpy(), [yi for _, yi in items])
    np.testing.assert_array_equal(bx.numpy(), x[ids[idx]])


def _worker_report(batch):
    info = get_worker_info()
    return batch, os.getpid(), info.dataset.opened_pid


@pytest.mark.parametrize("name", ["memmap", "shards", "encoded"])
def test_worker_opens_its_own_map(tmp_path, name):
    rng = np.random.default_rng(0)
    x, y = random_data(rng, 64, (5, 5), "uint8" if name in IMAGES_ONLY else "float32")
    spec, cfg = write_format(tmp_path / "export", name, x, y)
    ds = get_format(name).dataset(tmp_path / "export", spec, y, np.arange(64), cfg)
    ds[0]  # the main process opens its map first
    assert ds.opened_pid == os.getpid()
    assert len(pickle.dumps(ds)) < 8_000  # paths, ids and labels; never the mapped data
    assert pickle.loads(pickle.dumps(ds)).opened_pid is None
    loader = DataLoader(
        ds,
        batch_size=8,
        num_workers=2,
        collate_fn=_worker_report,
        multiprocessing_context="fork",
    )
    seen_x = []
    workers = set()
    for batch, pid, opened_pid in loader:
        assert pid != os.getpid()
        assert opened_pid == pid  # the worker opened the map itself, lazily
        workers.add(pid)
        seen_x.append(ds.collate_fn(batch)[0].numpy())
    assert len(workers) == 2
    np.testing.assert_array_equal(np.concatenate(seen_x), x)


@pytest.mark.parametrize("name", ["memmap", "shards"])
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_delivers_every_train_sample_once(tmp_path, name, workers):
    cfg = compose_cfg(tmp_path, [f"storage={name}", f"loader.num_workers={workers}", "loader.batch_size=16"])
    rng = np.random.default_rng(1)
    x, y = random_data(rng, 100, (4, 3), "float32")
    spec, scfg = write_format(tmp_path / "export", name, x, y, cfg=STORAGE_CFG[name])
    ids = np.sort(rng.choice(100, size=70, replace=False))
    ds = get_format(name).dataset(tmp_path / "export", spec, y, ids, scfg)
    loader = build_loader(ds, cfg.loader, seed=0, train=True, device=torch.device("cpu"))
    xs, ys = zip(*loader)
    got_x, got_y = torch.cat(xs).numpy(), torch.cat(ys).numpy()
    order = np.argsort(got_x[:, 0, 0])
    want = np.argsort(x[ids][:, 0, 0])
    np.testing.assert_array_equal(got_x[order], x[ids][want])
    np.testing.assert_array_equal(got_y[order], y[ids][want])
    assert not np.array_equal(got_x, x[ids])  # shuffled


def test_memmap_writer_preallocates_and_streams(tmp_path):
    """The file has its full size before any chunk arrives; chunks land in place."""
    spec = SampleSpec(1000, (8, 8), "float32", 2, ())
    (tmp_path / "e").mkdir()
    writer = get_format("memmap").writer(tmp_path / "e", spec, None)
    size = (tmp_path / "e" / "samples.npy").stat().st_size
    assert size >= 1000 * 64 * 4
    writer.write(np.ones((10, 8, 8), np.float32), np.zeros(10))
    writer.close()
    assert (tmp_path / "e" / "samples.npy").stat().st_size == size
