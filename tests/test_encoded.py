"""storage=encoded: encoded images in shard files, read like shards, decoded in __getitems__ (in workers)."""

from __future__ import annotations

import json
import os
import zlib
from functools import lru_cache

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from pipeline.data.integrity import IntegrityError, SampleReadError
from pipeline.data.sampling import BlockShuffleBatchSampler
from pipeline.data.sources import SampleSpec
from pipeline.data.storage import encoded
from pipeline.data.storage.sharded import BufferedBatch
from tests.conftest import compose_cfg
from tests.test_codec import PSNR_FLOOR_DB, psnr
from tests.test_shards import _batches as batches  # (positions, x, y) of one pass, via __getitems__

BASE = {"name": "encoded", "dtype": "uint8", "codec": "png", "quality": None, "decoder": "imagecodecs"}


def write(root, x, y, chunk=7, **cfg):
    """An encoded export of ``x`` (uint8 images) under ``root``: (spec, storage cfg)."""
    spec = SampleSpec(len(x), tuple(x.shape[1:]), "uint8", int(y.max()) + 1, ())
    cfg = OmegaConf.create({**BASE, "shard_size_mb": 64.0, "placement_seed": 0, **cfg})
    root.mkdir(parents=True)
    writer = encoded.Writer(root, spec, cfg)
    for start in range(0, len(x), chunk):
        writer.write(x[start : start + chunk], y[start : start + chunk])
    writer.close()
    writer.after_sync()
    return spec, cfg


def images(rng, n, shape, smooth=True):
    """uint8 images: smooth gradients plus noise (compressible, like photos) or pure noise."""
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    if smooth:
        ramp = np.linspace(0, 200, shape[1], dtype=np.float64)
        grad = ramp[None, None, :, None] if len(shape) == 3 else ramp[None, None, :]
        x = (grad + (x % 8)).astype(np.uint8)
    return x, rng.integers(0, 5, size=n).astype(np.int64)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 60),
    shape=st.sampled_from([(5, 7), (16, 9), (8, 8, 3), (1, 13, 3)]),
    codec=st.sampled_from([("png", None), ("webp", None)]),
    shard_kb=st.sampled_from([0.5, 2, 1000]),
    smooth=st.booleans(),
    chunk=st.integers(1, 50),
    buffers=st.sampled_from(["memory", "mapped"]),
    seed=st.integers(0, 2**16),
)
def test_lossless_round_trip_is_exact(
    tmp_path_factory, n, shape, codec, shard_kb, smooth, chunk, buffers, seed
):
    rng = np.random.default_rng(seed)
    x, y = images(rng, n, shape, smooth)
    root = tmp_path_factory.mktemp("enc") / "e"
    spec, cfg = write(root, x, y, chunk, codec=codec[0], quality=codec[1], shard_size_mb=shard_kb / 1024)
    ids = np.sort(rng.choice(n, size=max(1, n // 2), replace=False))
    ds = encoded.Dataset(root, spec, y, ids, {**cfg, "buffers": buffers, "shuffle_buffer_shards": 2})
    for p, bx, by in batches(ds, ds.batch_sampler(8, shuffle=True, drop_last=False, seed=seed)):
        assert bx.dtype == np.uint8 and bx.shape[1:] == shape
        np.testing.assert_array_equal(bx, x[ids[p]])
        np.testing.assert_array_equal(by, y[ids[p]])
    i = int(rng.integers(len(ids)))
    xi, yi = ds[i]  # a direct read
    np.testing.assert_array_equal(xi.numpy(), x[ids[i]])
    assert yi == y[ids[i]]


@lru_cache(maxsize=2)
def photo_crops(mode: str):
    from benchmarks.photos import photo_samples

    return photo_samples(48, (32, 32), mode, seed=3)


@pytest.mark.parametrize("mode", ["L", "RGB"])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(codec=st.sampled_from(["webp", "jpeg"]), quality=st.integers(75, 100))
def test_lossy_round_trip_stays_within_the_codecs_stated_psnr(tmp_path_factory, mode, codec, quality):
    x, y = photo_crops(mode)
    root = tmp_path_factory.mktemp("lossy") / "e"
    spec, cfg = write(root, x, y, 16, codec=codec, quality=quality, shard_size_mb=4 / 1024)
    ds = encoded.Dataset(root, spec, y, np.arange(len(x)), cfg)
    floor = PSNR_FLOOR_DB[90 if quality >= 90 else 75]
    seen = 0
    for p, bx, _ in batches(ds, ds.batch_sampler(10, shuffle=True, drop_last=False, seed=0)):
        for j, sid in enumerate(p.tolist()):
            assert psnr(bx[j], x[sid]) >= floor, (codec, quality, mode, sid)
        seen += len(p)
    assert seen == len(x)
    assert not ds.codec.lossless and ds.codec.describe() == f"{codec} q{quality}"


def _export(tmp_path, n=240, shape=(24, 20), shard_kb=3, buffers="auto", **cfg):
    rng = np.random.default_rng(5)
    x, y = images(rng, n, shape)
    spec, scfg = write(tmp_path / "e", x, y, chunk=17, shard_size_mb=shard_kb / 1024, **cfg)
    ids = np.sort(rng.choice(n, size=int(n * 0.8), replace=False))
    ds = encoded.Dataset(
        tmp_path / "e", spec, y, ids, {**scfg, "buffers": buffers, "shuffle_buffer_shards": 2}
    )
    return ds, x, y, ids


def test_shard_files_offsets_and_placement(tmp_path):
    ds, x, y, ids = _export(tmp_path)
    folder = tmp_path / "e" / "encoded"
    index = json.loads((folder / "index.json").read_text())
    assert index["layout"] == 1 and index["codec"]["name"] == "png" and index["codec"]["lossless"]
    assert index["codec"]["decoder"].startswith("imagecodecs ")
    assert not (folder / encoded.SPILL).exists()  # the spill is gone
    order = np.load(folder / "placement.npy")
    np.testing.assert_array_equal(np.sort(order), np.arange(len(x)))
    assert not np.array_equal(order, np.arange(len(x)))  # placed in a permutation, not in id order
    ends = np.load(folder / "offsets.npy")
    assert len(index["shards"]) == len(ds.files) > 4
    biggest = max(int(np.diff(f.offsets).max()) for f in ds.files)
    first = 0
    for k, s in enumerate(index["shards"]):
        data = (folder / s["file"]).read_bytes()
        assert len(data) == s["bytes"] <= 3 * 1024 + biggest  # records that start within 3 KiB
        assert k == len(index["shards"]) - 1 or s["bytes"] >= 3 * 1024 - biggest
        starts = np.concatenate(([0], ends[first : first + s["count"] - 1]))
        for j, (a, b) in enumerate(zip(starts, ends[first : first + s["count"]])):
            np.testing.assert_array_equal(ds.codec.decode(data[a:b], x.shape[1:]), x[order[first + j]])
        first += s["count"]
    assert first == len(x)
    assert sum(s["bytes"] for s in index["shards"]) < x.nbytes  # smaller than the raw codes


@pytest.mark.parametrize("buffers", ["memory", "mapped"])
def test_batches_carry_encoded_records_in_the_shards_order(tmp_path, buffers):
    """Each batch names where its encoded records lie in the buffers (memory) or only its positions (mapped);
    the order is the block shuffle's of (seed, epoch); every sample once per epoch; a new order each epoch,
    replayed by set_epoch."""
    ds, x, y, ids = _export(tmp_path, buffers=buffers)
    assert ds.buffers == buffers
    sampler = ds.batch_sampler(16, shuffle=True, drop_last=False, seed=3)
    plain = BlockShuffleBatchSampler(ds.shard_of, 2, 16, True, False, 3, local=ds.local)
    raw = []
    for b in sampler:  # a batch holds its buffer until it is read: read each before drawing the next
        raw.append(b)
        ds.__getitems__(b)
    if buffers == "memory":
        assert all(isinstance(b, BufferedBatch) for b in raw)
        assert sum(int(b.size.sum()) for b in raw) < len(ids) * x[0].nbytes  # encoded bytes, not pixels
    np.testing.assert_array_equal(np.concatenate([list(b) for b in raw]), np.concatenate(list(plain)))
    epoch1 = batches(ds, sampler)
    positions = np.concatenate([p for p, _, _ in epoch1])
    assert sorted(positions.tolist()) == list(range(len(ids)))
    for p, bx, by in epoch1:
        np.testing.assert_array_equal(bx, x[ids[p]])
        np.testing.assert_array_equal(by, y[ids[p]])
    sampler.set_epoch(1)
    np.testing.assert_array_equal(batches(ds, sampler)[2][1], epoch1[2][1])
    val = batches(ds, ds.batch_sampler(50, shuffle=False, drop_last=False, seed=0))
    np.testing.assert_array_equal(np.concatenate([p for p, _, _ in val]), np.argsort(ds.slot))  # file order


def _worker_report(batch):
    from torch.utils.data import get_worker_info

    return batch, os.getpid(), get_worker_info() is not None


def test_decoding_runs_in_the_workers_and_batches_match_0_workers_and_thread_prefetch(tmp_path):
    from pipeline.training.loading import build_loader

    ds, x, y, ids = _export(tmp_path, buffers="memory")

    def epochs(**loader):
        overrides = [f"loader.{k}={v}" for k, v in {"batch_size": 16, **loader}.items()]
        cfg = compose_cfg(tmp_path, overrides)
        built = build_loader(ds, cfg.loader, seed=4, train=True, device=torch.device("cpu"))
        return [[(bx.numpy(), by.numpy()) for bx, by in built] for _ in range(2)]

    ref = epochs()
    for loader in (dict(num_workers=2), dict(thread_prefetch=3)):
        got = epochs(**loader)
        assert [len(e) for e in got] == [len(e) for e in ref]
        for epoch_ref, epoch_got in zip(ref, got):
            for (rx, ry), (gx, gy) in zip(epoch_ref, epoch_got):
                np.testing.assert_array_equal(rx, gx)
                np.testing.assert_array_equal(ry, gy)
    # the loader hands each worker the encoded records; __getitems__ decodes them there
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=ds.batch_sampler(16, True, False, 0),
        num_workers=2,
        collate_fn=_worker_report,
        multiprocessing_context="fork",
    )
    pids = set()
    for (bx, _), pid, in_worker in loader:
        assert in_worker and pid != os.getpid() and bx.dtype == torch.uint8
        pids.add(pid)
    assert len(pids) == 2


def test_damaged_records_and_shards_are_named(tmp_path):
    ds, x, y, ids = _export(tmp_path, buffers="memory")
    folder, spec, cfg = tmp_path / "e" / "encoded", ds.spec, {"buffers": "memory"}
    shard = folder / "shard-00002.bin"
    data = shard.read_bytes()
    os.truncate(shard, len(data) - 5)  # truncated: named when the Dataset is built
    with pytest.raises(IntegrityError, match="shard-00002.bin is damaged.*truncated"):
        encoded.Dataset(tmp_path / "e", spec, y, ids, cfg)
    shard.write_bytes(data)
    ds = encoded.Dataset(tmp_path / "e", spec, y, ids, cfg)
    os.truncate(shard, len(data) // 2)  # truncated after the check: the read names it
    with pytest.raises(IntegrityError, match="shard-00002.bin.*truncated"):
        batches(ds, ds.batch_sampler(16, True, False, 0))
    # one corrupted byte inside the shard's second record: the file and the sample are named
    ends = np.load(folder / "offsets.npy")
    first = sum(s["count"] for s in json.loads((folder / "index.json").read_text())["shards"][:2])
    at = int(ends[first]) + 3
    shard.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    sid = int(np.load(folder / "placement.npy")[first + 1])
    everything = encoded.Dataset(tmp_path / "e", spec, y, np.arange(len(x)), cfg)
    with pytest.raises(SampleReadError, match=f"sample {sid} from .*shard-00002.bin.*CRC-32"):
        batches(everything, everything.batch_sampler(16, True, False, 0))
    with pytest.raises(SampleReadError, match=f"sample {sid} from .*shard-00002.bin"):
        everything[sid]
    # a record whose bytes match its CRC but do not decode (the CRC file rewritten to match)
    crc = np.load(folder / "crc32.npy")
    bad = data[: int(ends[first])] + b"\x89PNG garbage" + data[int(ends[first]) + 12 :]
    shard.write_bytes(bad)
    crc[first + 1] = zlib.crc32(bad[int(ends[first]) : int(ends[first + 1])])
    np.save(folder / "crc32.npy", crc)
    everything = encoded.Dataset(tmp_path / "e", spec, y, np.arange(len(x)), cfg)
    with pytest.raises(SampleReadError, match=f"sample {sid} from .*shard-00002.bin.*does not decode"):
        everything[sid]
    np.save(folder / "offsets.npy", ends[:-1])
    with pytest.raises(IntegrityError, match="offsets.npy"):
        encoded.Dataset(tmp_path / "e", spec, y, ids, cfg)


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["source=lfw"], "source=lfw: with source.color=false"),
        (["source=synthetic"], "source=synthetic: source.dtype=float32"),
        (["source=synthetic", "source.dtype=uint8", "source.shape=[4,4,4]"], r"source.shape=\[4, 4, 4\]"),
        (["storage.codec=jpeg"], "storage.quality=None -- jpeg is lossy"),
        (["storage.codec=png", "storage.quality=50"], "png is lossless"),
        (["storage.dtype=source"], "storage.dtype='source'"),
    ],
)
def test_what_cannot_be_encoded_is_refused_by_name_before_any_work(tmp_path, overrides, fragment):
    from pipeline.config.validate import ConfigError, validate

    cfg = compose_cfg(tmp_path, ["storage=encoded", *overrides])
    with pytest.raises(ConfigError, match=fragment) as err:
        validate(cfg)
    if overrides[0].startswith("source"):
        assert "storage=encoded encodes 8-bit images: source=image_folder" in str(err.value)


def test_codec_quality_and_decoder_are_in_the_fingerprint_and_the_manifest(tmp_path):
    from pipeline.data.export import export, export_name, fingerprint, open_export

    def name(*o):
        cfg = compose_cfg(tmp_path, ["storage=encoded", *o])
        return export_name(cfg.source, cfg.storage)

    names = {
        name(),
        name("storage.codec=webp"),
        name("storage.codec=webp", "storage.quality=80"),
        name("storage.codec=webp", "storage.quality=90"),
        name("storage.decoder=pillow"),
        name("storage.shard_size_mb=1"),
    }
    assert len(names) == 6
    assert name("storage.buffers=memory", "storage.shuffle_buffer_shards=9") == name()  # read-time options
    cfg = compose_cfg(tmp_path, ["storage=encoded", "storage.codec=jpeg", "storage.quality=85"])
    exp = export(cfg.source, cfg.storage, tmp_path / "data")
    m = exp.manifest
    assert m["storage"]["codec"] == "jpeg" and m["storage"]["quality"] == 85
    assert m["storage"]["decoder"] == "imagecodecs" and m["dtype"] == "uint8"
    assert m["format_identity"] == {"codec": "jpeg q85", "decoder": exp.dataset([0]).codec.decoder}
    assert m["values"]["divisor"] == 16.0  # digits: codes k stand for k / 16
    assert 0 < exp.stored_sample_bytes == m["stored_sample_bytes"] < 1_000
    # an export made with another decoder version (named by its hash) still opens by path; a manifest whose
    # recorded identity does not hash to its folder's name is refused
    old = {**m["format_identity"], "decoder": "imagecodecs 0.1"}
    fp = fingerprint(cfg.source, cfg.storage, old)
    assert fp != m["fingerprint"]
    moved = exp.root.with_name(exp.root.name.replace(m["fingerprint"], fp))
    exp.root.rename(moved)
    (moved / "manifest.json").write_text(
        json.dumps({**m, "format_identity": old, "fingerprint": fp, "name": moved.name})
    )
    assert open_export(moved).manifest["format_identity"] == old
    (moved / "manifest.json").write_text(json.dumps({**m, "fingerprint": fp, "name": moved.name}))
    with pytest.raises(IntegrityError, match="disagrees with its folder"):
        open_export(moved)


@pytest.mark.slow  # ~5 s; the default suite checks encoded batches for 0 or 2 workers (test_decoding_...)
def test_training_end_to_end_is_bitwise_identical_for_0_or_2_workers(tmp_path):
    """``pipeline storage=encoded transform=flip_crop loader.num_workers=2`` trains (digits: 8-bit), and its
    metrics are bitwise those of 0 workers with thread prefetch, with the augmentation on (one run for both,
    and for the other buffer mode: any difference would show)."""
    from tests.run_helpers import histories, run_job

    common = ["storage=encoded", "transform=flip_crop", "trainer.epochs=2", "storage.shard_size_mb=0.02"]
    runs = {
        name: run_job(tmp_path, [*common, *overrides], name)
        for name, overrides in [
            ("w2", ["loader.num_workers=2", "storage.buffers=memory"]),
            ("w0_prefetch", ["loader.num_workers=0", "loader.thread_prefetch=2", "storage.buffers=mapped"]),
        ]
    }
    h = {name: histories(tmp_path, run_id) for name, run_id in runs.items()}
    assert all(len(v) == 2 for v in h["w2"].values())
    assert h["w2"] == h["w0_prefetch"]
    assert h["w2"]["train/loss"][1][1] < h["w2"]["train/loss"][0][1]  # it learns
