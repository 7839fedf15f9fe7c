"""Damaged exports are detected and named: missing, truncated, corrupted, added or changed files, and a
manifest that disagrees with the files. Training never starts on them."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipeline.data.export import ExportError, export, open_export
from pipeline.data.integrity import FILE_LIST, MANIFEST, IntegrityError, SampleReadError
from pipeline.data.storage.per_sample import sample_path, sample_relpath
from tests.conftest import compose_cfg

SOURCE = {
    "name": "synthetic",
    "num_samples": 40,
    "shape": [4, 3],
    "num_classes": 3,
    "dtype": "float32",
    "seed": 0,
    "noise": 1.0,
    "block_size": 16,
}


@pytest.fixture(params=["pt", "npy"])
def exp(request, tmp_path):
    return export(OmegaConf.create(SOURCE), OmegaConf.create({"name": request.param}), tmp_path / "data")


def _file(exp, sid: int):
    return sample_path(exp.root, sid, exp.manifest["storage"]["name"])


def _rewrite_keep_mtime(path, data: bytes) -> None:
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _edit_manifest(exp, **changes) -> None:
    manifest = json.loads((exp.root / MANIFEST).read_text())
    manifest.update(changes)
    (exp.root / MANIFEST).write_text(json.dumps(manifest))


def test_intact_export_opens_cheaply_and_verifies(exp):
    assert open_export(exp.root).manifest["num_samples"] == 40
    assert open_export(exp.root, verify=True).labels.tolist() == exp.labels.tolist()
    listed = json.loads((exp.root / FILE_LIST).read_text())["files"]
    assert sample_relpath(7, exp.manifest["storage"]["name"]) in listed and "labels.npy" in listed


def test_missing_sample_file_is_named(exp):
    _file(exp, 7).unlink()
    with pytest.raises(IntegrityError, match=r"1 file\(s\) missing: samples/00000/000000007\.") as info:
        open_export(exp.root)
    print(info.value)


def test_truncated_file_is_named(exp):
    path = _file(exp, 3)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(
        IntegrityError, match=r"truncated or changed after export: samples/00000/000000003\.\w+ has 20 bytes"
    ):
        open_export(exp.root)


def test_rewritten_file_is_rehashed_and_named(exp):
    path = _file(exp, 5)
    data = bytearray(path.read_bytes())
    data[-4:] = b"\xff\xff\xff\xff"  # same size, different content, new mtime
    path.write_bytes(bytes(data))
    with pytest.raises(
        IntegrityError, match=r"changed after export \(content digest differs\): samples/00000/000000005"
    ):
        open_export(exp.root)


def test_corruption_hidden_from_size_and_mtime_is_found_by_verify(exp):
    path = _file(exp, 9)
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"  # a NaN in the last value: decodes fine, silently wrong
    _rewrite_keep_mtime(path, bytes(data))
    open_export(exp.root)  # the cheap check cannot see it: that is what verify is for
    with pytest.raises(IntegrityError, match=r"changed after export.*samples/00000/000000009") as info:
        open_export(exp.root, verify=True)
    print(info.value)


def test_added_file_is_named(exp):
    (exp.root / "samples" / "00000" / "extra.bin").write_bytes(b"x")
    with pytest.raises(IntegrityError, match=r"not written by the export: samples/00000/extra\.bin"):
        open_export(exp.root)


def test_symlink_in_export_is_refused(exp, tmp_path):
    path = _file(exp, 1)
    outside = tmp_path / "outside"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(outside)
    with pytest.raises(IntegrityError, match="is a symlink"):
        open_export(exp.root)


def test_edited_file_list_is_detected(exp):
    listing = json.loads((exp.root / FILE_LIST).read_text())
    rel = sorted(listing["files"])[0]
    listing["files"][rel][2] = "0" * 64
    (exp.root / FILE_LIST).write_text(json.dumps(listing))
    with pytest.raises(IntegrityError, match=r"files\.json was changed after export"):
        open_export(exp.root)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"source": {**SOURCE, "seed": 1}}, "disagrees with its folder"),
        ({"num_samples": 41}, r"holds 40 sample files for the manifest's 41 samples"),
        ({"num_classes": 2}, r"labels outside \[0, 2\)"),
        ({"files": {"count": 3, "bytes": 10, "list_sha256": "0" * 64}}, r"files\.json was changed"),
    ],
    ids=["config", "num_samples", "num_classes", "file_list_digest"],
)
def test_manifest_that_disagrees_with_the_files(exp, change, message):
    _edit_manifest(exp, **change)
    with pytest.raises(IntegrityError, match=message) as info:
        open_export(exp.root)
    print(info.value)


def test_manifest_count_disagreeing_with_file_list(exp):
    manifest = json.loads((exp.root / MANIFEST).read_text())
    manifest["files"]["count"] += 1
    (exp.root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=r"disagrees with the manifest's file count"):
        open_export(exp.root)


def test_broken_or_incomplete_manifest(exp):
    (exp.root / MANIFEST).write_text('{"fingerprint": ')
    with pytest.raises(IntegrityError, match="is not valid JSON"):
        open_export(exp.root)
    (exp.root / MANIFEST).write_text('{"fingerprint": "x"}')
    with pytest.raises(IntegrityError, match=r"lacks \['name', 'source'"):
        open_export(exp.root)
    (exp.root / MANIFEST).unlink()
    with pytest.raises(ExportError, match="has no manifest.json; delete it"):
        export(OmegaConf.create(SOURCE), OmegaConf.create(exp.manifest["storage"]), exp.root.parent)


def test_manifest_shape_disagreeing_with_sample_is_named_on_read(exp):
    _edit_manifest(exp, shape=[3, 4])
    ds = open_export(exp.root).dataset(np.arange(40))
    with pytest.raises(
        SampleReadError, match=r"cannot read sample 0 from .*000000000\.\w+: holds \(4, 3\) float32"
    ):
        ds[0]


def test_format_hook_finds_a_missing_sample_the_file_list_agrees_with(exp):
    """A writer that wrote too few samples: file list and manifest are consistent, the format check is not."""
    ext = exp.manifest["storage"]["name"]
    _file(exp, 39).unlink()
    listing = json.loads((exp.root / FILE_LIST).read_text())
    size = listing["files"].pop(sample_relpath(39, ext))[0]
    blob = json.dumps(listing).encode()
    (exp.root / FILE_LIST).write_bytes(blob)
    files = exp.manifest["files"]
    files.update(
        count=files["count"] - 1, bytes=files["bytes"] - size, list_sha256=hashlib.sha256(blob).hexdigest()
    )
    _edit_manifest(exp, files=files)
    with pytest.raises(
        IntegrityError, match=r"holds 39 sample files .* first missing: samples/00000/000000039"
    ):
        open_export(exp.root)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "remove"])
def test_damage_during_training_raises_named_error_not_a_cryptic_one(exp, damage):
    """Files damaged after the export was opened (mid-training) still fail with the file named."""
    ds = exp.dataset(np.arange(40))
    x, y = ds[2]
    assert tuple(x.shape) == (4, 3) and y == exp.labels[2]
    path = _file(exp, 2)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(path.stat().st_size))
    else:
        path.unlink()
    with pytest.raises(SampleReadError, match=rf"cannot read sample 2 from {path}: \w+") as info:
        ds[2]
    assert "delete that folder to re-export" in str(info.value)
    print(info.value)


def _run_job(tmp_path, overrides):
    from pipeline.job import run

    cfg = compose_cfg(tmp_path, overrides)
    with pytest.raises(IntegrityError) as info:
        run(cfg)
    return info.value


def _last_run(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    exp = client.get_experiment_by_name("pipeline")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]


def test_training_refuses_a_damaged_export_and_the_run_is_failed(tmp_path):
    overrides = [
        "source=synthetic",
        "source.num_samples=60",
        "source.shape=[4,3]",
        "storage=pt",
        "trainer.epochs=1",
    ]
    cfg = compose_cfg(tmp_path, overrides)
    exp = export(cfg.source, cfg.storage, cfg.paths.data_dir)
    path = _file(exp, 11)
    path.write_bytes(path.read_bytes()[:-8])
    err = _run_job(tmp_path, overrides)
    assert "samples/00000/000000011.pt" in str(err)
    run = _last_run(tmp_path)
    assert run.info.status == "FAILED" and "000000011.pt" in run.data.tags["error"]


def test_verify_option_stops_training_on_silent_corruption(tmp_path):
    overrides = [
        "source=synthetic",
        "source.num_samples=60",
        "source.shape=[4,3]",
        "storage=npy",
        "trainer.epochs=1",
    ]
    cfg = compose_cfg(tmp_path, overrides)
    exp = export(cfg.source, cfg.storage, cfg.paths.data_dir)
    path = _file(exp, 12)
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # +inf: decodes fine
    _rewrite_keep_mtime(path, bytes(data))
    err = _run_job(tmp_path, [*overrides, "verify=true"])
    assert "samples/00000/000000012.npy" in str(err) and "content digest differs" in str(err)
    assert _last_run(tmp_path).info.status == "FAILED"
