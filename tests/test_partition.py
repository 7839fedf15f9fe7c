"""Partition: exact sizes, disjoint and complete, seeded, stratified where possible."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipeline.data.partition import SplitError, load_split, partition, save_split


def _cfg(ratio=0.8, seed=0, stratify=True):
    return OmegaConf.create(dict(ratio=ratio, seed=seed, stratify=stratify))


def test_sizes_disjoint_complete():
    labels = np.repeat(np.arange(10), 37)
    split = partition(labels, _cfg(0.8))
    assert len(split.train) == int(370 * 0.8)
    assert not set(split.train) & set(split.val)
    assert sorted([*split.train, *split.val]) == list(range(370))
    assert split.train.dtype == np.int64


def test_stratified_keeps_class_proportions():
    labels = np.array([0] * 800 + [1] * 200)
    split = partition(labels, _cfg(0.75))
    assert split.stratified
    assert np.bincount(labels[split.train]).tolist() == [600, 150]


def test_seed_decides_the_split():
    labels = np.repeat(np.arange(4), 50)
    a, b, c = (
        partition(labels, _cfg(seed=1)),
        partition(labels, _cfg(seed=1)),
        partition(labels, _cfg(seed=2)),
    )
    np.testing.assert_array_equal(a.train, b.train)
    assert a.digest == b.digest != c.digest


def test_singleton_classes_fall_back_to_plain_shuffle(caplog):
    labels = np.arange(50)  # every class has one sample, like most LFW people
    split = partition(labels, _cfg(0.8))
    assert not split.stratified and len(split.train) == 40
    assert "cannot stratify" in caplog.text


@pytest.mark.parametrize("ratio", [0.01, 0.049])
def test_ratio_leaving_a_part_empty_is_an_error(ratio):
    with pytest.raises(SplitError, match="split.ratio"):
        partition(np.arange(20) % 2, _cfg(ratio))


def test_save_and_load(tmp_path):
    split = partition(np.repeat(np.arange(3), 10), _cfg())
    back = load_split(save_split(split, tmp_path / "split.npz"))
    np.testing.assert_array_equal(back.train, split.train)
    assert back.stratified == split.stratified
