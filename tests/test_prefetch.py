"""In-process prefetch: same batches as without it, errors surface, early exit stops the thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from pipeline.data.storage import get_format
from pipeline.training.loading import build_loader
from pipeline.training.prefetch import ThreadPrefetcher
from tests.conftest import compose_cfg
from tests.test_storage_formats import random_data, write_format


def _dataset(tmp_path, name="memmap"):
    x, y = random_data(np.random.default_rng(0), 200, (6, 5), "float32")
    spec, cfg = write_format(tmp_path / "e", name, x, y)
    return get_format(name).dataset(tmp_path / "e", spec, y, np.arange(200), cfg)


@pytest.mark.parametrize("workers", [0, 2])
def test_prefetch_gives_the_same_batches(tmp_path, workers):
    ds = _dataset(tmp_path)
    runs = {}
    for depth in (0, 3):
        cfg = compose_cfg(
            tmp_path,
            ["storage=memmap", f"loader.thread_prefetch={depth}", f"loader.num_workers={workers}"],
        )
        loader = build_loader(ds, cfg.loader, seed=5, train=True, device=torch.device("cpu"))
        assert loader.prefetch == depth
        assert (
            (loader.batch_size, loader.drop_last) == (64, False) and len(loader) == 4 and loader.dataset is ds
        )
        runs[depth] = [(x.clone(), y.clone()) for x, y in loader]
    assert len(runs[0]) == len(runs[3]) == 4
    for (x0, y0), (x3, y3) in zip(runs[0], runs[3]):
        assert torch.equal(x0, x3) and torch.equal(y0, y3)


def test_prefetch_raises_the_producer_error():
    def broken():
        yield 1
        raise OSError("disk gone")

    class Loader:
        def __iter__(self):
            return broken()

    it = iter(ThreadPrefetcher(Loader(), depth=2))
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "batch-prefetch"]


def test_prefetch_stops_its_thread_on_early_exit():
    assert _prefetch_threads() == []
    loader = ThreadPrefetcher(range(10_000), depth=2)
    for i in loader:
        assert len(_prefetch_threads()) == 1
        if i == 3:
            break
    assert _prefetch_threads() == []  # joined on the way out, not left blocked on a full queue
    assert list(ThreadPrefetcher(range(5), depth=1)) == [0, 1, 2, 3, 4]


def test_prefetch_depth_validated(tmp_path):
    from pipeline.config.validate import ConfigError, validate

    with pytest.raises(ConfigError, match="loader.thread_prefetch"):
        validate(compose_cfg(tmp_path, ["loader.thread_prefetch=-1"]))
    with pytest.raises(ValueError):
        ThreadPrefetcher([], depth=0)


def test_same_order_with_and_without_workers(tmp_path):
    """The fast single-process path draws the same seeds as the stock worker iterator."""
    ds = _dataset(tmp_path, "shards")
    orders = []
    for workers in (0, 2):
        cfg = compose_cfg(tmp_path, ["storage=shards", f"loader.num_workers={workers}"])
        loader = build_loader(ds, cfg.loader, seed=3, train=True, device=torch.device("cpu"))
        orders.append([torch.cat([y for _, y in loader]) for _ in range(2)])
    for a, b in zip(*orders):
        assert torch.equal(a, b)
