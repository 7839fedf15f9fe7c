"""8-bit storage (storage.dtype=uint8): exact round trip, the model sees float storage's values bit for bit,
8-bit-less sources are refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from pipeline.config.validate import ConfigError, validate
from pipeline.data import quantize
from pipeline.data.export import export, fingerprint
from pipeline.data.storage import formats
from pipeline.training.models import Input
from tests.conftest import compose_cfg
from tests.run_helpers import histories, run_job
from tests.test_sources import LFW, make_lfw_cache

DIVISORS = (255.0, 16.0)


def _bits(a) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@settings(max_examples=40, deadline=None)
@given(
    codes=st.lists(st.integers(0, 255), min_size=1, max_size=300),
    divisor=st.sampled_from(DIVISORS),
)
def test_encode_then_levels_is_exact(codes, divisor):
    k = np.array(codes, dtype=np.uint8)
    x = (k.astype(np.float32) / np.float32(divisor)).reshape(-1, 1)  # how the sources compute them
    back = quantize.encode(x, divisor)
    assert back.dtype == np.uint8 and np.array_equal(back.ravel(), k)
    assert np.array_equal(_bits(quantize.levels(divisor)[back]), _bits(x))


@settings(max_examples=30, deadline=None)
@given(
    codes=st.lists(st.integers(0, 255), min_size=2, max_size=50),
    at=st.integers(0, 49),
    nudge=st.sampled_from(["up", "down", "nan", "negative", "above"]),
)
def test_encode_refuses_any_value_off_the_levels(codes, at, nudge):
    x = quantize.levels(255.0)[np.array(codes)].reshape(1, -1)
    at %= x.shape[1]
    x[0, at] = {
        "up": np.nextafter(x[0, at], np.float32(np.inf)),
        "down": np.nextafter(x[0, at], np.float32(-np.inf)),
        "nan": np.nan,
        "negative": -1 / 255,
        "above": 256 / 255,
    }[nudge]
    with pytest.raises(quantize.NotEightBit, match=r"sample 7 holds .* use storage.dtype=source"):
        quantize.encode(x, 255.0, first_id=7)


@pytest.mark.parametrize("divisor", [None, *DIVISORS])
def test_model_input_maps_codes_to_the_levels_bit_for_bit(divisor):
    codes = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        got = Input("uint8", divisor).to(device)(codes.to(device)).cpu()
        assert np.array_equal(_bits(got).ravel(), _bits(quantize.levels(divisor))), device


def test_lfw_colour_values_are_the_255_levels_and_grey_ones_are_not(tmp_path):
    from pipeline.data.sources import build_source

    make_lfw_cache(tmp_path)
    colour = build_source(OmegaConf.create({**LFW, "color": True, "data_home": str(tmp_path)}))
    x, _ = next(iter(colour.chunks()))
    codes = quantize.encode(x, quantize.divisor_for(OmegaConf.create({**LFW, "color": True})))
    assert np.array_equal(_bits(quantize.levels(255.0)[codes]), _bits(x))
    grey = build_source(OmegaConf.create({**LFW, "data_home": str(tmp_path)}))
    x, _ = next(iter(grey.chunks()))
    with pytest.raises(quantize.NotEightBit):
        quantize.encode(x, 255.0)


def _cfg(tmp_path, *overrides):
    return compose_cfg(tmp_path, list(overrides))


@pytest.mark.parametrize(
    "overrides, why",
    [
        (["source=lfw"], "source=lfw: with source.color=false"),
        (["source=synthetic"], "source=synthetic: source.dtype=float32"),
    ],
)
def test_sources_that_are_not_8_bit_are_refused_by_name(tmp_path, overrides, why):
    with pytest.raises(ConfigError) as err:
        validate(_cfg(tmp_path, *overrides, "storage.dtype=uint8"))
    msg = str(err.value)
    assert msg.startswith("Invalid config: storage.dtype='uint8'") and why in msg
    assert "source=lfw with source.color=true" in msg and "storage.dtype=source" in msg


def test_8_bit_sources_are_accepted(tmp_path):
    for overrides in (
        ["source=lfw", "source.color=true"],
        ["source=digits"],
        ["source=synthetic", "source.dtype=uint8"],
    ):
        validate(_cfg(tmp_path, *overrides, "storage.dtype=uint8"))


def test_default_dtype_keeps_existing_export_names():
    source = {"name": "digits"}
    assert fingerprint(source, {"name": "memmap"}) == fingerprint(
        source, {"name": "memmap", "dtype": "source"}
    )
    assert fingerprint(source, {"name": "memmap"}) != fingerprint(
        source, {"name": "memmap", "dtype": "uint8"}
    )


@pytest.mark.parametrize("name", sorted(formats()))
def test_uint8_export_reads_back_float_storages_values(tmp_path, name):
    """Digits (k/16) stored as float32 and as uint8: the model's input is the same, bit for bit. ``encoded``
    stores uint8 only: against float32 ``npy``."""
    cfg = _cfg(tmp_path, f"storage={'npy' if name == 'encoded' else name}")
    as_float = export(cfg.source, cfg.storage, tmp_path / "data")
    cfg8 = _cfg(tmp_path, f"storage={name}", "storage.dtype=uint8")
    as_uint8 = export(cfg8.source, cfg8.storage, tmp_path / "data")
    assert as_uint8.root != as_float.root and as_uint8.spec.dtype == "uint8"
    manifest = json.loads((as_uint8.root / "manifest.json").read_text())
    assert manifest["values"] == {"stored": "uint8", "divisor": 16.0, "value": "float32(code) / float32(16)"}
    assert manifest["dtype"] == "uint8" and manifest["storage"]["dtype"] == "uint8"
    bytes_f, bytes_8 = as_float.manifest["files"]["bytes"], as_uint8.manifest["files"]["bytes"]
    assert bytes_f > (3 if name in ("memmap", "ram", "shards") else 1) * bytes_8  # per-file: headers
    ids = np.arange(len(as_float.labels))
    ref, got = as_float.dataset(ids, cfg.storage), as_uint8.dataset(ids, cfg8.storage)
    inp_f, inp_8 = Input(as_float.spec.dtype), Input("uint8", as_uint8.spec.divisor)
    for i in (0, 5, len(ids) - 1):
        (xf, yf), (x8, y8) = ref[i], got[i]
        assert x8.dtype == torch.uint8 and yf == y8
        assert np.array_equal(_bits(inp_8(x8[None])), _bits(inp_f(xf[None])))


def test_training_on_uint8_storage_is_bitwise_the_float_run(tmp_path):
    """The same job on float32 and on uint8 storage: identical metrics, bit for bit, every epoch."""
    common = ["trainer.epochs=2", "storage=memmap"]
    runs = {
        dtype: run_job(tmp_path, [*common, f"storage.dtype={dtype}"], dtype) for dtype in ("source", "uint8")
    }
    h = {dtype: histories(tmp_path, run_id) for dtype, run_id in runs.items()}
    assert len(h["source"]["train/loss"]) == 2
    assert h["source"] == h["uint8"]
