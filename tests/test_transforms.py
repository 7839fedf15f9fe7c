"""The transform group: per-sample flip/crop and random resized crop (checked against references), seeded per
(seed, epoch, sample id) so any number of workers and decode threads gives the same batches, and the train
split's normalisation figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from pipeline.config.schema import LoaderConfig, TransformConfig
from pipeline.config.validate import ConfigError, validate
from pipeline.data.export import export
from pipeline.training.loading import build_loader
from pipeline.training.models import Input
from pipeline.training.transforms import (
    Augment,
    Resize,
    flip_crop_into,
    from_config,
    resize_into,
    train_stats,
    uniforms,
)
from tests.conftest import compose_cfg
from tests.run_helpers import epochs, same_batches


def reference(img: np.ndarray, flip: bool, top: int, left: int, padding: int) -> np.ndarray:
    """Mirror, zero-pad, slice."""
    h, w = img.shape[:2]
    img = img[:, ::-1] if flip else img
    pad = [(padding, padding), (padding, padding)] + [(0, 0)] * (img.ndim - 2)
    return np.pad(img, pad)[top : top + h, left : left + w]


@settings(max_examples=80, deadline=None)
@given(
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    channels=st.sampled_from([None, 1, 3]),
    padding=st.integers(0, 4),
    dtype=st.sampled_from([np.uint8, np.float32]),
    seed=st.integers(0, 2**31),
)
def test_flip_crop_equals_the_reference(h, w, channels, padding, dtype, seed):
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels is None else (h, w, channels)
    img = rng.integers(1, 256, size=shape).astype(dtype)
    flip = bool(rng.random() < 0.5)
    top, left = (int(v) for v in rng.integers(0, 2 * padding + 1, size=2))
    out = np.full_like(img, 77)  # whatever was there before is overwritten
    flip_crop_into(img, out, flip, top, left, padding)
    assert np.array_equal(out, reference(img, flip, top, left, padding))


def test_uniforms_are_a_function_of_seed_epoch_and_sample_only():
    ids = np.array([5, 9, 123456789, 0])
    u = uniforms(7, 2, ids, 3)
    assert u.shape == (4, 3) and ((u >= 0) & (u < 1)).all()
    np.testing.assert_array_equal(uniforms(7, 2, ids[::-1], 3), u[::-1])  # batch order does not matter
    np.testing.assert_array_equal(uniforms(7, 2, ids[1:2], 3), u[1:2])  # nor which batch holds it
    assert not np.array_equal(uniforms(7, 3, ids, 3), u) and not np.array_equal(uniforms(8, 2, ids, 3), u)
    many = uniforms(0, 0, np.arange(100_000), 1)
    assert abs(many.mean() - 0.5) < 0.01 and abs((many < 0.5).mean() - 0.5) < 0.01


def test_resize_of_float_images_is_pillows_bilinear_and_keeps_a_constant_image():
    """uint8 images go through Pillow itself; other dtypes through numpy, which must agree with Pillow's
    bilinear filter (half-pixel centres) where Pillow has a float mode (grey, upsampling: no antialias)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img = rng.random((9, 11)).astype(np.float32)
    out = np.empty((14, 20), dtype=np.float32)
    resize_into(img, out, (1.0, 2.0, 9.0, 8.0))
    want = np.asarray(Image.fromarray(img, mode="F").resize((20, 14), Image.BILINEAR, box=(1, 2, 9, 8)))
    np.testing.assert_allclose(out, want, atol=1e-5)
    rgb = np.repeat(img[:, :, None], 3, axis=2)
    out3 = np.empty((14, 20, 3), dtype=np.float32)
    resize_into(rgb, out3, (1.0, 2.0, 9.0, 8.0))
    np.testing.assert_allclose(out3[:, :, 1], want, atol=1e-5)
    for dtype in (np.uint8, np.float32):
        flat = np.full((20, 30), 42, dtype=dtype)
        small = np.empty((7, 5), dtype=dtype)
        resize_into(flat, small)
        assert (small == 42).all()


def test_random_resized_crop_gives_the_train_size_and_validation_resizes():
    cfg = OmegaConf.structured(TransformConfig(resized_crop=True, flip=True, size=[8, 6]))
    train, val = from_config(cfg, (20, 30, 3))
    assert isinstance(train, Augment) and isinstance(val, Resize)
    assert train.output_shape((20, 30, 3)) == val.output_shape((20, 30, 3)) == (8, 6, 3)
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    outs = []
    for sid in range(20):
        out = np.empty((8, 6, 3), dtype=np.uint8)
        train.apply(img, out, uniforms(0, 0, [sid], train.draws)[0])
        outs.append(out)
    assert len({o.tobytes() for o in outs}) == 20  # every sample its own box
    box = train.box(20, 30, uniforms(0, 0, [3], train.draws)[0])
    area = (box[2] - box[0]) * (box[3] - box[1]) / (20 * 30)
    assert 0.08 - 1e-9 <= area <= 1.0 and 0 <= box[0] <= box[2] <= 30 and 0 <= box[1] <= box[3] <= 20
    assert from_config(OmegaConf.structured(TransformConfig()), (20, 30)) == (None, None)
    same_size = OmegaConf.structured(TransformConfig(size=[20, 30]))
    assert from_config(same_size, (20, 30)) == (None, None)  # nothing to do


def _export(tmp_path, n=60, shape=(6, 5), dtype="uint8", storage=None):
    storage = storage or {"name": "shards", "shard_size_mb": 0.002, "shuffle_buffer_shards": 2}
    from pipeline.data.sources.synthetic import SyntheticConfig

    src = OmegaConf.structured(SyntheticConfig(num_samples=n, shape=list(shape), num_classes=3, dtype=dtype))
    exp = export(src, OmegaConf.create(storage), tmp_path / "data")
    ids = np.arange(n)
    return exp, exp.dataset(ids, OmegaConf.create(storage))


@pytest.mark.parametrize("buffers", ["memory", "mapped"])
def test_batches_are_augmented_alike_for_any_workers_threads_or_prefetch(tmp_path, buffers):
    exp, ds = _export(
        tmp_path,
        storage={"name": "shards", "shard_size_mb": 0.002, "shuffle_buffer_shards": 2, "buffers": buffers},
    )
    cpu, aug = torch.device("cpu"), Augment(flip=True, padding=1)

    def loader(**kw):
        cfg = OmegaConf.structured(LoaderConfig(batch_size=8, pin_memory="false", **kw))
        return build_loader(ds, cfg, seed=3, train=True, device=cpu, transform=aug)

    ref = epochs(loader(), 3)
    assert not torch.equal(ref[0][0][0], ref[1][0][0])  # epochs differ (shuffle and draws)
    for kw in (
        dict(num_workers=2),
        dict(decode_threads=3),
        dict(num_workers=1, decode_threads=2),
        dict(thread_prefetch=2, num_workers=2, persistent_workers=True),
    ):
        assert same_batches(epochs(loader(**kw), 3), ref), kw
    replay = loader()
    replay.set_epoch(2)
    assert same_batches(epochs(replay, 1), ref[2:])
    val = build_loader(ds, OmegaConf.structured(LoaderConfig(batch_size=8)), seed=3, train=False, device=cpu)
    x, y = next(iter(val))
    first = np.argsort(ds.slot)[:8]  # unshuffled shards: file order
    assert torch.equal(x, ds.__getitems__(first)[0])  # validation: not augmented


def test_train_stats_are_those_of_the_decoded_values_and_alike_for_uint8_storage(tmp_path):
    figures = {}
    for dtype in ("source", "uint8"):
        cfg = compose_cfg(tmp_path, ["storage=memmap", f"storage.dtype={dtype}"])
        exp = export(cfg.source, cfg.storage, tmp_path / "data")
        ids = np.arange(0, len(exp.labels), 2)
        figures[dtype] = train_stats(exp.dataset(ids, cfg.storage), exp.spec, chunk=100)
        ds = exp.dataset(ids, cfg.storage)
        values = Input(exp.spec.dtype, exp.spec.divisor)(ds.__getitems__(list(range(len(ids))))[0]).numpy()
        assert np.isclose(figures[dtype][0], values.mean(dtype=np.float64), rtol=1e-6)
        assert np.isclose(figures[dtype][1], values.std(dtype=np.float64), rtol=1e-6)
    for a, b in zip(figures["source"], figures["uint8"]):
        assert a.dtype == np.float32 and a.tobytes() == b.tobytes()


def test_rgb_stats_are_per_channel():
    class Rgb(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            x = torch.zeros(4, 3, 3, dtype=torch.uint8)
            x[..., 0], x[..., 1], x[..., 2] = 255, 51 * (i % 2), 7
            return x, 0

    class Spec:
        dtype, divisor, shape = "uint8", None, (4, 3, 3)

    mean, std = train_stats(Rgb(), Spec())
    assert mean.shape == (3,) and np.allclose(mean, [1.0, 0.1, 7 / 255]) and np.allclose(std, [1.0, 0.1, 1.0])


def test_flip_crop_needs_images(tmp_path):
    cfg = compose_cfg(tmp_path, ["source=synthetic", "source.shape=[100]", "transform=flip_crop"])
    with pytest.raises(ConfigError, match=r"transform.name='flip_crop' -- flip, crop and resize need images"):
        validate(cfg)
    validate(compose_cfg(tmp_path, ["source=synthetic", "source.shape=[100]", "transform=normalize"]))
    with pytest.raises(ConfigError, match="transform.crop_padding=-1"):
        validate(compose_cfg(tmp_path, ["transform=flip_crop", "transform.crop_padding=-1"]))
