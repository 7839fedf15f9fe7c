"""Nothing from a data file is unpickled, and names taken from data cannot lead outside the data dir."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from pipeline.data.export import export, open_export
from pipeline.data.integrity import FILE_LIST, IntegrityError, SampleReadError, write_file_list
from pipeline.data.safe_paths import UnsafePath, safe_join, safe_name, safe_relpath
from pipeline.data.storage.per_sample import sample_path

SOURCE = {
    "name": "synthetic",
    "num_samples": 12,
    "shape": [3, 2],
    "num_classes": 2,
    "dtype": "float32",
    "seed": 0,
    "noise": 1.0,
    "block_size": 8,
}


class Payload:
    """Unpickling this runs os.mkdir(marker): proof that a loader executed code from a data file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture(params=["pt", "npy"])
def exp(request, tmp_path):
    return export(OmegaConf.create(SOURCE), OmegaConf.create({"name": request.param}), tmp_path / "data")


def _plant(exp, path, marker) -> None:
    if path.suffix == ".pt":
        torch.save({"x": Payload(str(marker))}, path)  # a real torch.save zip holding a malicious pickle
    else:
        np.save(path, np.array([Payload(str(marker))], dtype=object), allow_pickle=True)


def test_malicious_pickle_in_a_sample_file_is_refused(exp, tmp_path):
    marker = tmp_path / "pwned"
    path = sample_path(exp.root, 4, exp.manifest["storage"]["name"])
    _plant(exp, path, marker)
    ds = exp.dataset(np.arange(12))  # the already-open export: the reader itself must refuse
    with pytest.raises(SampleReadError, match=rf"cannot read sample 4 from {path}") as info:
        ds[4]
    assert not marker.exists(), "a data file's pickle was executed"
    print(info.value)
    with pytest.raises(IntegrityError):  # and the next run's check names the changed file
        open_export(exp.root)
    assert not marker.exists()


def _relist(exp) -> None:
    """Rewrite files.json and the manifest to match the files: an attacker who can rewrite everything."""
    manifest = json.loads((exp.root / "manifest.json").read_text())
    manifest["files"] = write_file_list(exp.root)
    (exp.root / "manifest.json").write_text(json.dumps(manifest))


def test_pickled_labels_file_is_refused_even_with_a_consistent_file_list(exp, tmp_path):
    marker = tmp_path / "pwned-labels"
    np.save(exp.root / "labels.npy", np.array([Payload(str(marker))] * 12, dtype=object), allow_pickle=True)
    _relist(exp)
    with pytest.raises(
        IntegrityError, match=r"labels\.npy cannot be read: Object arrays cannot be loaded"
    ) as info:
        open_export(exp.root, verify=True)
    assert not marker.exists(), "labels.npy's pickle was executed"
    print(info.value)


def test_malicious_sample_with_a_consistent_file_list_is_refused_on_read(exp, tmp_path):
    marker = tmp_path / "pwned-sample"
    path = sample_path(exp.root, 7, exp.manifest["storage"]["name"])
    _plant(exp, path, marker)
    _relist(exp)
    ds = open_export(exp.root, verify=True).dataset(np.arange(12))
    with pytest.raises(SampleReadError, match=rf"cannot read sample 7 from {path}"):
        ds[7]
    assert not marker.exists()


def test_file_list_cannot_point_outside_the_export(exp, tmp_path):
    listing = json.loads((exp.root / FILE_LIST).read_text())
    listing["files"]["../../secret"] = [1, 1, "0" * 64]
    blob = json.dumps(listing).encode()
    (exp.root / FILE_LIST).write_bytes(blob)
    manifest = json.loads((exp.root / "manifest.json").read_text())
    manifest["files"]["list_sha256"] = hashlib.sha256(blob).hexdigest()
    (exp.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=r"lists an unsafe path: '\.\./\.\./secret'"):
        open_export(exp.root)


@pytest.mark.parametrize(
    "parts",
    [("..",), ("../x",), ("a/../../x",), ("/etc/passwd",), ("a", "/etc"), ("a\x00b",), ("sub", "..", "..")],
)
def test_safe_join_refuses_escapes(tmp_path, parts):
    with pytest.raises(UnsafePath):
        safe_join(tmp_path, *parts)


def test_safe_join_refuses_a_symlink_leading_out(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePath, match="outside"):
        safe_join(root, "link", "x")
    assert safe_join(root, "a/b/../c") == (root / "a" / "c").resolve()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "../x", "x\x00"])
def test_safe_name_refuses_anything_but_one_component(name):
    with pytest.raises(UnsafePath):
        safe_name(name)


@pytest.mark.parametrize("rel", ["", "/abs", "a//b", "a/./b", "a/../b", "..", "a\\b", "x\x00"])
def test_safe_relpath_refuses(rel):
    with pytest.raises(UnsafePath):
        safe_relpath(rel)


@settings(max_examples=300, deadline=None)
@given(name=st.text(alphabet=st.sampled_from(list("ab./\\\x00 -_é")), max_size=12))
def test_any_name_taken_from_data_stays_inside_root(tmp_path_factory, name):
    root = tmp_path_factory.getbasetemp() / "root"
    root.mkdir(exist_ok=True)
    for guard in (lambda: safe_join(root, name), lambda: safe_join(root, safe_name(name))):
        try:
            path = guard()
        except UnsafePath:
            continue
        assert path == root.resolve() or path.is_relative_to(root.resolve())


def test_class_names_in_the_manifest_are_data_not_paths(tmp_path):
    """Class names are only stored in the manifest JSON; a hostile one round-trips as a plain string."""
    exp = export(OmegaConf.create(SOURCE), OmegaConf.create({"name": "npy"}), tmp_path / "data")
    manifest = json.loads((exp.root / "manifest.json").read_text())
    assert manifest["class_names"] == ["class_0", "class_1"]
    with pytest.raises(UnsafePath):
        safe_join(exp.root, safe_name("../../etc"))
    assert not [p for p in exp.root.rglob("*") if p.is_file() and p.suffix in (".pkl", ".pickle")]
