"""Per-sample storage formats write every sample to its own file and read it back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.sources import SampleSpec
from pipeline.data.storage import formats, get_format
from pipeline.data.storage.per_sample import sample_path


@pytest.mark.parametrize("name", ["pt", "npy"])
@pytest.mark.parametrize("dtype,shape", [("float32", (8, 8)), ("uint8", (5, 4, 3)), ("float64", (7,))])
def test_round_trip(tmp_path, name, dtype, shape):
    rng = np.random.default_rng(0)
    n = 25
    x = (rng.standard_normal((n, *shape)) * 50).astype(dtype)
    y = rng.integers(0, 3, n)
    spec = SampleSpec(n, shape, dtype, 3, ("a", "b", "c"))
    fmt = get_format(name)
    writer = fmt.writer(tmp_path, spec, None)
    writer.write(x[:10], y[:10])  # chunk boundaries must not matter
    writer.write(x[10:], y[10:])
    writer.close()
    ids = np.array([3, 17, 0, 24])
    ds = fmt.dataset(tmp_path, spec, y, ids, None)
    assert len(ds) == 4
    for i, sid in enumerate(ids):
        sample, label = ds[i]
        assert isinstance(sample, torch.Tensor) and sample.dtype == torch.from_numpy(x[:1]).dtype
        np.testing.assert_array_equal(sample.numpy(), x[sid])
        assert label == y[sid]


@pytest.mark.parametrize("name", ["pt", "npy"])
def test_sample_file_holds_one_sample_not_the_chunk(tmp_path, name):
    x = np.zeros((1000, 8, 8), np.float32)
    spec = SampleSpec(1000, (8, 8), "float32", 1, ("a",))
    writer = get_format(name).writer(tmp_path, spec, None)
    writer.write(x, np.zeros(1000, np.int64))
    assert sample_path(tmp_path, 999, name).stat().st_size < 4 * 8 * 8 + 2000


def test_registry_rejects_unknown_format():
    with pytest.raises(ValueError, match="valid"):
        get_format("parquet")
    assert {"pt", "npy"} <= set(formats())
