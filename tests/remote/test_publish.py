"""Publishing a real export to a real S3 server, and opening it: manifest last, races, kills, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.data.export import export
from pipeline.data.integrity import IntegrityError, write_file_list
from pipeline.data.remote.cache import ObjectCache
from pipeline.data.remote.errors import BucketNotFound, LocationError, ObjectNotFound
from pipeline.data.remote.publish import collect_orphans, open_remote, publish, remote_manifest
from pipeline.data.remote.store import MIB, sha256_file
from pipeline.data.remote.urls import parse_location

REPO = Path(__file__).resolve().parents[2]
SRC = dict(
    name="synthetic",
    num_samples=1200,
    shape=[16, 16],
    num_classes=3,
    dtype="float32",
    seed=0,
    noise=1.0,
    block_size=600,
)


@pytest.fixture(scope="module")
def local_export(tmp_path_factory):
    """A complete shards export (12 shards of ~100 KB, index, placement, labels) built by the project."""
    exp = export(
        OmegaConf.create(SRC),
        OmegaConf.create({"name": "shards", "shard_size_mb": 0.1}),
        tmp_path_factory.mktemp("d"),
    )
    return exp.root


def rebuild(root: Path, dest: Path) -> Path:
    """Another build of the same export (same name and bytes, new files: another files.json)."""
    shutil.copytree(root, dest, copy_function=shutil.copy)
    time.sleep(0.01)
    for f in dest.rglob("*.npy"):
        os.utime(f)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["files"] = write_file_list(dest)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def _verify_all(s3, name: str, local: Path, cache_dir: Path) -> None:
    with ObjectCache(s3.store, cache_dir, 100 * MIB) as cache:
        exp = open_remote(s3.url("exports"), name, cache)
        assert (exp.root / "labels.npy").read_bytes() == (local / "labels.npy").read_bytes()
        assert (exp.root / "shards" / "index.json").is_file() and (
            exp.root / "shards" / "placement.npy"
        ).is_file()
        assert len(exp.shards) == 12
        exp.prefetch(exp.shards)
        for rel in exp.shards:
            assert exp.fetch(rel).read_bytes() == (local / rel).read_bytes()
            exp.release(rel)


def _keys(s3, prefix: str = "exports/") -> set[str]:
    return {o["Key"] for o in s3.raw.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])}


def test_the_manifest_appears_only_after_every_file(s3, local_export, tmp_path):
    name = local_export.name
    s3.proxy.slow(4 * MIB)  # so the test's listings (straight to the server) see the publish mid-way
    result = {}
    t = threading.Thread(
        target=lambda: result.update(pub=publish(local_export, s3.url("exports"), threads=2))
    )
    t.start()
    snapshots = []
    while t.is_alive():
        snapshots.append(_keys(s3))
        time.sleep(0.01)
    t.join()
    s3.proxy.slow(None)
    pub = result["pub"]
    files = json.loads((local_export / "files.json").read_text())["files"]
    data = {f"exports/{name}/{pub.version}/{rel}" for rel in [*files, "files.json"]}
    manifest = f"exports/{name}/manifest.json"
    assert any(snap & data and manifest not in snap for snap in snapshots)  # seen mid-publish
    assert all(data <= snap for snap in snapshots if manifest in snap)
    assert _keys(s3) == data | {manifest}
    assert not pub.reused and pub.uploaded_bytes == sum(v[0] for v in files.values()) + len(
        (local_export / "files.json").read_bytes()
    )
    assert (
        remote_manifest(s3.url("exports"), name)["fingerprint"]
        == json.loads((local_export / "manifest.json").read_text())["fingerprint"]
    )
    _verify_all(s3, name, local_export, tmp_path / "cache")
    again = publish(local_export, s3.url("exports"))
    assert again.reused and again.uploaded_bytes == 0 and again.version == pub.version


@pytest.mark.slow
def test_two_jobs_publishing_the_same_export_at_once(s3, local_export, tmp_path):
    other = rebuild(local_export, tmp_path / local_export.name)
    s3.proxy.slow(8 * MIB)
    jobs = [_start_publish(root, s3.url("exports")) for root in (local_export, other)]
    results = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in jobs]
    assert [p.returncode for p in jobs] == [0, 0]
    s3.proxy.slow(None)
    winner = remote_manifest(s3.url("exports"), local_export.name)["remote"]["data"]
    assert {v for v, _ in results} == {winner}  # the loser reports (and uses) the winner's version
    assert sorted(reused for _, reused in results) == [False, True]
    versions = {k.split("/")[2] for k in _keys(s3) if k.count("/") > 2}
    assert versions == {winner}  # the loser removed its own upload (moto honours If-None-Match)
    _verify_all(s3, local_export.name, local_export, tmp_path / "cache")


def _start_publish(root: Path, url: str) -> subprocess.Popen:
    """A real job publishing ``root``; prints ``[version, reused]`` when done."""
    code = (
        "import json; from pipeline.data.remote.publish import publish; "
        f"p = publish({str(root)!r}, {url!r}, threads=2); print(json.dumps([p.version, p.reused]))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )


def _kill_mid_upload(s3, root: Path, version_files: int) -> None:
    proc = _start_publish(root, s3.url("exports"))
    try:
        deadline = time.monotonic() + 60
        version = "v-" + json.loads((root / "manifest.json").read_text())["files"]["list_sha256"][:16]
        while len(_keys(s3, f"exports/{root.name}/{version}/")) < version_files:
            assert proc.poll() is None, "the publish ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


@pytest.mark.slow
def test_a_killed_publish_is_finished_by_the_next_run_and_orphans_are_collected(s3, local_export, tmp_path):
    name = local_export.name
    stale = rebuild(local_export, tmp_path / "stale" / name)
    s3.proxy.slow(1 * MIB)
    _kill_mid_upload(s3, stale, 2)  # a build whose publish is never finished
    _kill_mid_upload(s3, local_export, 3)
    s3.proxy.slow(None)
    assert f"exports/{name}/manifest.json" not in _keys(s3)  # nothing looks published
    pub = publish(local_export, s3.url("exports"))
    assert not pub.reused and pub.skipped_files >= 3  # finished what the killed run had uploaded
    versions = {k.split("/")[2] for k in _keys(s3) if k.count("/") > 2}
    assert len(versions) == 2  # the stale build's folder is young: left (it could be a live publish)
    gone = collect_orphans(parse_location(s3.url("exports")), name, s3.store, grace_s=0)
    assert len(gone) == 1 and {k.split("/")[2] for k in _keys(s3) if k.count("/") > 2} == {pub.version}
    _verify_all(s3, name, local_export, tmp_path / "cache")


def test_refusals_name_what_is_wrong(s3, local_export, tmp_path):
    with pytest.raises(LocationError, match="gs://"):
        publish(local_export, "gs://bucket/exports")
    with pytest.raises(LocationError, match="object-store location"):
        publish(local_export, tmp_path / "local")
    with pytest.raises(BucketNotFound, match="'missing-bucket'"):
        publish(local_export, "s3://missing-bucket/exports")
    half = tmp_path / "half"
    shutil.copytree(local_export, half)
    (half / "manifest.json").unlink()
    with pytest.raises(IntegrityError, match="manifest.json is missing"):
        publish(half, s3.url("exports"))
    (half / "manifest.json").write_text((local_export / "manifest.json").read_text())
    (half / "shards" / "shard-00003.npy").write_bytes(b"x")
    with pytest.raises(IntegrityError, match="shard-00003.npy"):
        publish(half, s3.url("exports"))
    assert _keys(s3) == set()  # nothing was uploaded
    with ObjectCache(s3.store, tmp_path / "c", MIB) as cache:
        with pytest.raises(ObjectNotFound, match=f"no export nope is published at {s3.url('exports')}"):
            open_remote(s3.url("exports"), "nope", cache)


def test_a_corrupted_shard_in_a_published_export_is_named(s3, local_export, tmp_path):
    pub = publish(local_export, s3.url("exports"))
    key = f"exports/{pub.name}/{pub.version}/shards/shard-00002.npy"
    s3.raw.put_object(Bucket=s3.bucket, Key=key, Body=os.urandom(s3.store.head(key).size))
    with ObjectCache(s3.store, tmp_path / "c", 10 * MIB) as cache:
        exp = open_remote(s3.url("exports"), pub.name, cache)
        assert sha256_file(exp.fetch("shards/shard-00001.npy")) == exp.files["shards/shard-00001.npy"][1]
        with pytest.raises(IntegrityError, match=f"s3://{s3.bucket}/{key}"):
            exp.fetch("shards/shard-00002.npy")
