"""Property-based tests (hypothesis): the partition, storage round-trips and samplers hold for any input."""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.config.schema import LoaderConfig
from pipeline.data.partition import partition
from pipeline.data.sources import SampleSpec
from pipeline.data.storage import get_format
from pipeline.training.loading import build_loader
from tests.test_determinism import Ids

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def labelled(draw):
    k = draw(st.integers(1, 8))
    n = draw(st.integers(2, 300))
    labels = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    return np.array(labels, dtype=np.int64)


@FAST
@given(labels=labelled(), ratio=st.floats(0.05, 0.95), seed=st.integers(0, 2**31 - 1), stratify=st.booleans())
def test_partition_is_disjoint_complete_exact_and_stratified(labels, ratio, seed, stratify):
    n = len(labels)
    n_train = int(n * ratio)
    assume(0 < n_train < n)
    split = partition(labels, SimpleNamespace(ratio=ratio, seed=seed, stratify=stratify))
    train, val = split.train, split.val
    assert len(train) == n_train and len(val) == n - n_train  # exact sizes
    assert len(np.intersect1d(train, val)) == 0  # disjoint
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(n))  # complete
    assert len(np.unique(train)) == len(train)
    again = partition(labels, SimpleNamespace(ratio=ratio, seed=seed, stratify=stratify))
    assert np.array_equal(again.train, train)  # seeded
    if split.stratified:  # each class keeps its proportion: within one sample of count * n_train / n
        for c, count in zip(*np.unique(labels, return_counts=True)):
            in_train = int((labels[train] == c).sum())
            assert abs(in_train - count * n_train / n) < 1 + 1e-9, (c, count, in_train)
    if stratify and not split.stratified:  # fallback only when stratifying is impossible
        counts = np.unique(labels, return_counts=True)[1]
        assert counts.min() < 2 or len(counts) > n_train or len(counts) > n - n_train


DTYPES = ["float16", "float32", "float64", "uint8", "int8", "int16", "int32", "int64", "bool"]


@st.composite
def samples(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 12))
    size = n * int(np.prod(shape))
    if dtype == "bool":
        flat = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    elif dtype.startswith("float"):
        flat = draw(st.lists(st.floats(width=int(dtype[5:]), allow_nan=True), min_size=size, max_size=size))
    else:
        info = np.iinfo(dtype)
        flat = draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=size, max_size=size))
    x = np.array(flat, dtype=dtype).reshape(n, *shape)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
    return x, cuts


@FAST
@given(data=samples(), fmt=st.sampled_from(["pt", "npy"]))
def test_storage_round_trip_any_shape_and_dtype(data, fmt):
    x, cuts = data
    n = len(x)
    y = np.arange(n, dtype=np.int64) % 3
    spec = SampleSpec(
        num_samples=n, shape=x.shape[1:], dtype=str(x.dtype), num_classes=3, class_names=("a", "b", "c")
    )
    module = get_format(fmt)
    with tempfile.TemporaryDirectory() as root:
        writer = module.writer(root, spec, None)
        bounds = [0, *cuts, n]
        for a, b in zip(bounds[:-1], bounds[1:]):  # arbitrary chunking
            if b > a:
                writer.write(x[a:b], y[a:b])
        writer.close()
        ids = np.random.default_rng(n).permutation(n)
        ds = module.dataset(root, spec, y, ids, None)
        assert len(ds) == n
        for i, sid in enumerate(ids):
            got, label = ds[i]
            assert isinstance(got, torch.Tensor) and label == y[sid]
            back = got.numpy()
            assert back.dtype == x.dtype and back.shape == x.shape[1:]
            assert np.array_equal(back, x[sid], equal_nan=x.dtype.kind == "f")
            assert back.tobytes() == x[sid].tobytes()  # bit-exact (NaN payloads and -0.0 included)


@FAST
@given(
    n=st.integers(1, 200),
    batch_size=st.integers(1, 64),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_sampler_visits_each_index_once_per_epoch(n, batch_size, shuffle, drop_last, seed):
    cfg = LoaderConfig(batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, pin_memory="false")
    loader = build_loader(Ids(n), cfg, seed=seed, train=True, device=torch.device("cpu"))
    expected = (n // batch_size) * batch_size if drop_last else n
    for _epoch in range(2):
        seen = torch.cat([x for x, _ in loader]).tolist() if len(loader) else []
        assert len(seen) == expected and len(set(seen)) == expected  # each index at most once
        if not drop_last:
            assert sorted(seen) == list(range(n))  # ... and every index exactly once
        if not shuffle:
            assert seen == list(range(expected))
