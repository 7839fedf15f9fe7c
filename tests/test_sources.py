"""Sources: digits offline, synthetic deterministic per block, LFW from a local cache or a clear error."""

from __future__ import annotations

import time

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from pipeline.data.sources import build_source
from pipeline.data.sources.lfw import LFWUnavailable


def _cfg(**kw):
    return OmegaConf.create(kw)


def test_digits_source():
    src = build_source(_cfg(name="digits"))
    assert src.spec.num_samples == 1797 and src.spec.shape == (8, 8) and src.spec.num_classes == 10
    x = np.concatenate([c[0] for c in src.chunks()])
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0


def _synthetic(**kw):
    base = dict(
        name="synthetic",
        num_samples=2500,
        shape=[6, 5],
        num_classes=4,
        dtype="float32",
        seed=3,
        noise=0.5,
        block_size=1000,
    )
    return build_source(_cfg(**{**base, **kw}))


def test_synthetic_is_deterministic_and_chunked():
    a, b = _synthetic(), _synthetic()
    chunks_a, chunks_b = list(a.chunks()), list(b.chunks())
    assert [len(y) for _, y in chunks_a] == [1000, 1000, 500]  # never more than a block in memory
    for (xa, ya), (xb, yb) in zip(chunks_a, chunks_b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    other = list(_synthetic(seed=4).chunks())
    assert not np.array_equal(other[0][0], chunks_a[0][0])


def test_synthetic_block_can_be_made_alone():
    src = _synthetic()
    last = list(src.chunks())[2]
    x2, y2 = _synthetic().block(2)
    np.testing.assert_array_equal(x2, last[0])
    np.testing.assert_array_equal(y2, last[1])


def test_synthetic_uint8_and_learnable_classes():
    src = _synthetic(dtype="uint8", noise=0.1)
    x, y = next(iter(src.chunks()))
    assert x.dtype == np.uint8
    # samples of one class sit closer to each other than to another class
    c0, c1 = x[y == 0].astype(float), x[y == 1].astype(float)
    assert np.abs(c0[0] - c0[1]).mean() < np.abs(c0[0] - c1[0]).mean()


def make_lfw_cache(data_home, people=("Ada_Lovelace", "Alan_Turing", "Grace_Hopper"), per_person=3):
    """A tiny LFW-layout cache that scikit-learn's fetch_lfw_people reads offline."""
    home = data_home / "lfw_home"
    rng = np.random.default_rng(0)
    for person in people:
        folder = home / "lfw_funneled" / person
        folder.mkdir(parents=True)
        for i in range(per_person):
            pixels = rng.integers(0, 255, size=(250, 250, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / f"{person}_{i + 1:04d}.jpg")
    for name in ("pairsDevTrain.txt", "pairsDevTest.txt", "pairs.txt"):
        (home / name).write_text("1\n")
    return data_home


LFW = dict(
    name="lfw",
    min_faces_per_person=0,
    resize=0.5,
    color=False,
    funneled=True,
    download_if_missing=False,
    download_timeout_s=5.0,
    download_retries=1,  # offline: at most 2 attempts of 5 s
)


def test_lfw_reads_a_local_cache(tmp_path):
    make_lfw_cache(tmp_path)
    src = build_source(_cfg(data_home=str(tmp_path), **LFW))
    assert src.spec.num_samples == 9 and src.spec.shape == (62, 47) and src.spec.num_classes == 3
    assert src.spec.class_names == ("Ada Lovelace", "Alan Turing", "Grace Hopper")
    x, y = next(iter(src.chunks()))
    assert x.shape == (9, 62, 47) and sorted(np.bincount(y)) == [3, 3, 3]


@pytest.mark.parametrize("download", [False, True])
def test_lfw_without_data_fails_fast_with_instructions(tmp_path, download):
    t0 = time.monotonic()
    with pytest.raises(LFWUnavailable) as err:
        build_source(_cfg(data_home=str(tmp_path), **{**LFW, "download_if_missing": download}))
    assert time.monotonic() - t0 < 30
    msg = str(err.value)
    assert "pairsDevTrain.txt" in msg and "lfw_funneled" in msg and f"source.data_home={tmp_path}" in msg
