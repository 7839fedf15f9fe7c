"""Export: fingerprinted folder, manifest, atomic publish, reuse, and refusal of damaged folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipeline.data.export import ExportError, export, export_name, open_export
from pipeline.data.sources import build_source
from pipeline.data.storage.per_sample import sample_path

SYN = dict(
    name="synthetic",
    num_samples=300,
    shape=[4, 3],
    num_classes=3,
    dtype="float32",
    seed=0,
    noise=1.0,
    block_size=128,
)


def _cfgs(storage="npy", **src):
    return OmegaConf.create({**SYN, **src}), OmegaConf.create({"name": storage})


def test_export_writes_manifest_labels_and_every_sample(tmp_path):
    src, sto = _cfgs()
    exp = export(src, sto, tmp_path)
    assert not exp.reused and exp.root == tmp_path / export_name(src, sto)
    m = json.loads((exp.root / "manifest.json").read_text())
    assert (
        m["num_samples"] == 300
        and m["shape"] == [4, 3]
        and m["class_names"] == ["class_0", "class_1", "class_2"]
    )
    assert m["fingerprint"] == exp.fingerprint and m["files"]["count"] == 301  # samples + labels
    truth = list(build_source(src).chunks())
    np.testing.assert_array_equal(exp.labels, np.concatenate([y for _, y in truth]))
    assert exp.labels.dtype == np.int64
    ds = exp.dataset(np.arange(300))
    np.testing.assert_array_equal(ds[299][0].numpy(), truth[-1][0][-1])
    assert not list(tmp_path.glob(".tmp-*"))


def test_complete_export_is_reused_not_rewritten(tmp_path):
    src, sto = _cfgs()
    first = export(src, sto, tmp_path)
    mtime = sample_path(first.root, 5, "npy").stat().st_mtime_ns
    second = export(src, sto, tmp_path)
    assert second.reused and second.root == first.root
    assert sample_path(first.root, 5, "npy").stat().st_mtime_ns == mtime


def test_fingerprint_depends_on_source_and_storage(tmp_path):
    names = {export_name(*_cfgs()), export_name(*_cfgs(seed=1)), export_name(*_cfgs(storage="pt"))}
    assert len(names) == 3


def test_leftover_temp_folder_is_never_used(tmp_path):
    src, sto = _cfgs()
    stale = tmp_path / f".tmp-{export_name(src, sto)}-deadbeef"
    stale.mkdir(parents=True)
    (stale / "manifest.json").write_text("{}")
    exp = export(src, sto, tmp_path)
    assert not exp.reused and not stale.exists()


def test_folder_without_manifest_is_refused(tmp_path):
    src, sto = _cfgs()
    (tmp_path / export_name(src, sto)).mkdir(parents=True)
    with pytest.raises(ExportError, match="manifest.json"):
        export(src, sto, tmp_path)


@pytest.mark.parametrize("damage", ["remove", "truncate"])
def test_damaged_export_is_detected(tmp_path, damage):
    exp = export(*_cfgs(), tmp_path)
    victim = sample_path(exp.root, 7, "npy")
    if damage == "remove":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:20])
    with pytest.raises(
        ExportError, match=r"missing: samples/00000/000000007\.npy|000000007\.npy has 20 bytes"
    ):
        open_export(exp.root)
    with pytest.raises(ExportError):
        export(*_cfgs(), tmp_path)
