"""The transform group: flip/crop of whole batches (checked against a per-sample reference), seeded per
(seed, epoch, batch) whatever the workers, and the train split's normalisation figures."""

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
from pipeline.training.transforms import FlipCrop, flip_crop, train_stats
from tests.conftest import compose_cfg


def reference(x: np.ndarray, flip, top, left, padding: int) -> np.ndarray:
    """One sample at a time: mirror, zero-pad, slice."""
    out = np.empty_like(x)
    h, w = x.shape[1:3]
    for i, img in enumerate(x):
        img = img[:, ::-1] if flip[i] else img
        pad = [(padding, padding), (padding, padding)] + [(0, 0)] * (img.ndim - 2)
        out[i] = np.pad(img, pad)[top[i] : top[i] + h, left[i] : left[i] + w]
    return out


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 6),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    channels=st.sampled_from([None, 1, 3]),
    padding=st.integers(0, 4),
    dtype=st.sampled_from([np.uint8, np.float32]),
    seed=st.integers(0, 2**31),
)
def test_flip_crop_equals_the_per_sample_reference(b, h, w, channels, padding, dtype, seed):
    rng = np.random.default_rng(seed)
    shape = (b, h, w) if channels is None else (b, h, w, channels)
    x = rng.integers(1, 256, size=shape).astype(dtype)
    flip = rng.random(b) < 0.5
    top, left = rng.integers(0, 2 * padding + 1, size=(2, b))
    got = flip_crop(
        torch.from_numpy(x), torch.from_numpy(flip), torch.from_numpy(top), torch.from_numpy(left), padding
    )
    assert got.dtype == torch.from_numpy(x).dtype and got.shape == x.shape
    assert np.array_equal(got.numpy(), reference(x, flip, top, left, padding))


def test_flip_crop_draws_depend_on_the_generator_only():
    x = torch.arange(8 * 6 * 5, dtype=torch.float32).reshape(8, 6, 5) + 1
    aug = FlipCrop(flip=True, padding=2)

    def run(seed):
        return aug(x, torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    out = run(1)
    assert (out == 0).any() and not torch.equal(out, x)  # some padding shows, something moved
    assert torch.equal(FlipCrop(flip=False, padding=0)(x, torch.Generator()), x)
    assert FlipCrop.from_config(OmegaConf.structured(TransformConfig())) is None
    with pytest.raises(ValueError, match=r"needs image batches"):
        aug(torch.zeros(4, 10), torch.Generator())


class Images(torch.utils.data.Dataset):
    """Item i: a 6x5 image whose pixels encode i, and label i."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int):
        return torch.arange(30, dtype=torch.float32).reshape(6, 5) + 100 * i + 1, i


def _epochs(loader, n: int):
    return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(n)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        len(ea) == len(eb)
        and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(ea, eb))
        for ea, eb in zip(a, b)
    )


def test_batches_are_augmented_alike_with_0_or_2_workers_and_thread_prefetch():
    cpu, aug = torch.device("cpu"), FlipCrop(flip=True, padding=1)

    def loader(**kw):
        cfg = OmegaConf.structured(LoaderConfig(batch_size=8, pin_memory="false", **kw))
        return build_loader(Images(), cfg, seed=3, train=True, device=cpu, augment=aug)

    ref = _epochs(loader(), 3)
    assert not torch.equal(ref[0][0][0], ref[1][0][0])  # epochs differ (shuffle and draws)
    for kw in (dict(num_workers=2), dict(thread_prefetch=2), dict(num_workers=2, persistent_workers=True)):
        assert _same(_epochs(loader(**kw), 3), ref), kw
    replay = loader()
    replay.set_epoch(2)
    assert _same(_epochs(replay, 1), ref[2:])
    val = build_loader(
        Images(),
        OmegaConf.structured(LoaderConfig(batch_size=8)),
        seed=3,
        train=False,
        device=cpu,
        augment=aug,
    )
    x, y = next(iter(val))
    assert torch.equal(x, torch.stack([Images()[int(i)][0] for i in y]))  # validation: not augmented


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
    with pytest.raises(ConfigError, match=r"transform.name='flip_crop' -- flip and crop need images"):
        validate(cfg)
    validate(compose_cfg(tmp_path, ["source=synthetic", "source.shape=[100]", "transform=normalize"]))
    with pytest.raises(ConfigError, match="transform.crop_padding=-1"):
        validate(compose_cfg(tmp_path, ["transform=flip_crop", "transform.crop_padding=-1"]))
