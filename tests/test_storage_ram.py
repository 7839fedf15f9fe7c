"""storage=ram: the same samples as a per-file format, held in one in-memory array."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.export import export
from tests.conftest import compose_cfg


def test_ram_dataset_matches_npy_and_holds_the_split_in_memory(tmp_path):
    base = ["source=synthetic", "source.num_samples=3000", "source.block_size=700"]
    ram_cfg = compose_cfg(tmp_path, [*base, "storage=ram"])
    npy_cfg = compose_cfg(tmp_path, [*base, "storage=npy"])
    ram_exp = export(ram_cfg.source, ram_cfg.storage, tmp_path / "data")
    npy_exp = export(npy_cfg.source, npy_cfg.storage, tmp_path / "data")
    ids = np.random.default_rng(0).permutation(3000)[:2000]
    ram_ds = ram_exp.dataset(ids)
    npy_ds = npy_exp.dataset(ids)
    assert len(ram_ds) == 2000
    # the split is an array of its own in memory, not a view of the memory-mapped file
    assert type(ram_ds.x) is np.ndarray and ram_ds.x.base is None and ram_ds.x.shape == (2000, 62, 47)
    assert isinstance(ram_ds.labels, np.ndarray) and isinstance(ram_ds.ids, np.ndarray)
    for i in (0, 1, 777, 1999):
        (xr, yr), (xn, yn) = ram_ds[i], npy_ds[i]
        assert torch.equal(xr, xn) and yr == yn
