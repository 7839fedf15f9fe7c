"""DataLoaders from the loader config, with real worker processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pipeline.config.schema import LoaderConfig
from pipeline.data.export import export
from pipeline.training.loading import build_loader

SYN = dict(
    name="synthetic",
    num_samples=200,
    shape=[4, 4],
    num_classes=5,
    dtype="float32",
    seed=0,
    noise=1.0,
    block_size=64,
)


def _loader_cfg(**kw):
    return OmegaConf.structured(LoaderConfig(**{"batch_size": 16, "pin_memory": "auto", **kw}))


@pytest.fixture
def dataset(tmp_path):
    exp = export(OmegaConf.create(SYN), OmegaConf.create({"name": "npy"}), tmp_path)
    ids = np.arange(0, 200, 2)
    return exp, ids, exp.dataset(ids)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_per_epoch(dataset, workers):
    exp, ids, ds = dataset
    loader = build_loader(
        ds,
        _loader_cfg(num_workers=workers, persistent_workers=workers > 0),
        seed=0,
        train=True,
        device=torch.device("cpu"),
    )
    assert not loader.pin
    for _ in range(2):
        seen = []
        for x, y in loader:
            assert x.shape[1:] == (4, 4) and y.dtype == torch.int64
            seen.append(y)
        assert sum(len(s) for s in seen) == len(ids)
        np.testing.assert_array_equal(np.sort(torch.cat(seen).numpy()), np.sort(exp.labels[ids]))


def test_order_is_seeded_and_independent_of_workers(dataset):
    _, _, ds = dataset

    def order(seed, workers):
        loader = build_loader(
            ds, _loader_cfg(num_workers=workers), seed=seed, train=True, device=torch.device("cpu")
        )
        return torch.cat([x.flatten(1)[:, 0] for x, _ in loader])

    assert torch.equal(order(0, 0), order(0, 2))
    assert not torch.equal(order(0, 0), order(1, 0))


def test_val_loader_keeps_order(dataset):
    exp, ids, ds = dataset
    loader = build_loader(
        ds, _loader_cfg(shuffle=True, drop_last=True), seed=0, train=False, device=torch.device("cpu")
    )
    labels = torch.cat([y for _, y in loader]).numpy()
    np.testing.assert_array_equal(labels, exp.labels[ids])
