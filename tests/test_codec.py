"""The sample codec (pipeline/data/codec.py): lossless codecs exact, lossy ones within the stated PSNR, the
fast decoder pixel-identical to Pillow, bad blobs and settings named."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.data.codec import DECODERS, Codec, CodecError, problem

LOSSLESS = [("png", None), ("webp", None)]
# the floors docs/compact-samples.md states: real photo crops of 32x32 to 64x64, grey or RGB
PSNR_FLOOR_DB = {75: 25.0, 90: 28.0}


def images():
    """Any uint8 image, grey [H, W] or RGB [H, W, 3], 1 to 40 pixels a side (noise, flat, anything)."""
    shapes = st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([None, 3]))
    return shapes.flatmap(
        lambda s: arrays(np.uint8, s[:2] if s[2] is None else s, elements=st.integers(0, 255))
    )


@settings(max_examples=60, deadline=None)
@given(img=images(), which=st.sampled_from(LOSSLESS), decoder=st.sampled_from(DECODERS))
def test_lossless_codecs_give_back_the_exact_pixels(img, which, decoder):
    c = Codec(*which, decoder=decoder)
    assert c.lossless
    back = c.decode(c.encode(img), img.shape)
    assert back.dtype == np.uint8 and np.array_equal(back, img)


@lru_cache(maxsize=4)
def _photo_crops(mode: str, size: int) -> np.ndarray:
    from benchmarks.photos import photo_samples

    return photo_samples(40, (size, size), mode, seed=size)[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["webp", "jpeg"]),
    quality=st.integers(75, 100),
    mode=st.sampled_from(["L", "RGB"]),
    size=st.sampled_from([32, 64]),
    i=st.integers(0, 39),
)
def test_lossy_codecs_stay_within_the_stated_psnr_on_photos(name, quality, mode, size, i):
    img = _photo_crops(mode, size)[i]
    c = Codec(name, quality)
    assert not c.lossless
    back = c.decode(c.encode(img), img.shape)
    floor = PSNR_FLOOR_DB[90 if quality >= 90 else 75]
    assert psnr(back, img) >= floor, (name, quality, mode, size, i)


@settings(max_examples=30, deadline=None)
@given(img=images(), which=st.sampled_from([*LOSSLESS, ("webp", 60), ("jpeg", 90), ("jpeg", 40)]))
def test_the_fast_decoder_gives_pillows_pixels(img, which):
    blob = Codec(*which).encode(img)
    fast, ref = (Codec(*which, decoder=d).decode(blob, img.shape) for d in ("imagecodecs", "pillow"))
    assert np.array_equal(fast, ref)


def test_decode_into_a_batch_row_and_describe():
    img = _photo_crops("RGB", 32)[0]
    batch = np.zeros((3, *img.shape), dtype=np.uint8)
    c = Codec("webp")
    c.decode_into(c.encode(img), batch[1])
    assert np.array_equal(batch[1], img) and not batch[0].any() and not batch[2].any()
    imgs = _photo_crops("RGB", 32)[:5]
    assert np.array_equal(c.decode_batch([c.encode(i) for i in imgs], imgs.shape[1:]), imgs)
    assert (c.describe(), Codec("webp", 80).describe(), Codec("png").describe()) == (
        "webp lossless",
        "webp q80",
        "png",
    )
    assert c.decoder.startswith("imagecodecs ")


@pytest.mark.parametrize("decoder", DECODERS)
def test_broken_blobs_and_wrong_shapes_are_named(decoder):
    img = _photo_crops("L", 32)[0]
    png = Codec("png", decoder=decoder)
    with pytest.raises(CodecError, match="does not decode"):
        png.decode(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, img.shape)
    with pytest.raises(CodecError, match=r"decodes to \(32, 32\), expected \(32, 31\)"):
        png.decode(png.encode(img), (32, 31))
    with pytest.raises(CodecError):
        Codec("jpeg", 90, decoder=decoder).decode(png.encode(img), img.shape)  # a PNG is no JPEG
    with pytest.raises(CodecError, match="uint8 \\[H, W\\] or \\[H, W, 3\\]"):
        png.encode(img.astype(np.float32))


@pytest.mark.parametrize(
    "name, quality, fragment",
    [
        ("jpeg", None, "jpeg is lossy: give a quality"),
        ("png", 90, "png is lossless and takes no quality"),
        ("webp", 0, "quality=0 must be an integer in 1..100"),
        ("webp", 101, "quality=101"),
        ("gif", None, "codec 'gif' is not one of ['png', 'webp', 'jpeg']"),
    ],
)
def test_bad_settings_are_named(name, quality, fragment):
    assert fragment in problem(name, quality)
    with pytest.raises(CodecError, match=fragment.split(":")[0].replace("[", "\\[")):
        Codec(name, quality)
    assert problem("webp", None) is None and problem("jpeg", 75) is None
