"""Export stage: write a source's samples to disk in a storage format, once.

    from pipeline.export import export
    exp = export(cfg.source, cfg.storage, data_dir="outputs/data")
    exp.root, exp.spec, exp.labels, exp.reused

The export lives in ``<data_dir>/<source>-<storage>-<fingerprint>/``, where the fingerprint hashes
the source and storage configs (and the layout version). It is built in a hidden temporary folder
beside it and renamed into place only when every file and the manifest are written and synced, so a
folder with that name is always complete. A complete export is reused, never rewritten. An
inter-process lock per export makes concurrent jobs build it once: the others wait, then reuse it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from pipeline import progress
from pipeline.sources import SampleSpec, build_source, source_identity
from pipeline.storage import get_format

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
MANIFEST = "manifest.json"
LABELS = "labels.npy"


class ExportError(RuntimeError):
    """An export folder that is missing, incomplete or does not match its manifest."""


@dataclass
class Export:
    root: Path
    manifest: dict
    labels: np.ndarray
    reused: bool

    @property
    def spec(self) -> SampleSpec:
        m = self.manifest
        return SampleSpec(
            num_samples=m["num_samples"],
            shape=tuple(m["shape"]),
            dtype=m["dtype"],
            num_classes=m["num_classes"],
            class_names=tuple(m["class_names"]),
        )

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def dataset(self, ids: np.ndarray, storage_cfg=None):
        """A map-style Dataset over the sample ids ``ids`` of this export."""
        fmt = get_format(self.manifest["storage"]["name"])
        return fmt.Dataset(self.root, self.spec, self.labels, ids, storage_cfg)


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def fingerprint(source_cfg, storage_cfg) -> str:
    payload = {
        "layout": LAYOUT_VERSION,
        "source": _plain(source_cfg),
        "storage": _plain(storage_cfg),
    }
    identity = source_identity(source_cfg)  # e.g. an image folder's file listing
    if identity is not None:
        payload["source_identity"] = identity
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def export_name(source_cfg, storage_cfg) -> str:
    return f"{source_cfg.name}-{storage_cfg.name}-{fingerprint(source_cfg, storage_cfg)}"


def _walk_files(root: Path) -> tuple[int, int]:
    """Number of files and their total bytes under ``root`` (the manifest not included)."""
    count = total = 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.name != MANIFEST or Path(entry.path).parent != root:
                    count += 1
                    total += entry.stat(follow_symlinks=False).st_size
    return count, total


def open_export(root: Path) -> Export:
    """Open a published export, checking its manifest and (cheaply) its files' count and size."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ExportError(f"{root} is not a complete export: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{manifest_path} is not valid JSON: {err}") from err
    count, total = _walk_files(root)
    want = manifest["files"]
    if (count, total) != (want["count"], want["bytes"]):
        raise ExportError(
            f"{root} does not match its manifest: {count} files / {total} bytes on disk, "
            f"manifest says {want['count']} files / {want['bytes']} bytes "
            "(a file was removed, truncated or added after export); delete the folder to re-export"
        )
    labels = np.load(root / LABELS, allow_pickle=False)
    if labels.shape != (manifest["num_samples"],):
        raise ExportError(
            f"{root / LABELS} holds {labels.shape} labels, manifest says {manifest['num_samples']}"
        )
    return Export(root=root, manifest=manifest, labels=labels, reused=True)


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish %s", path.stem)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def export(source_cfg, storage_cfg, data_dir) -> Export:
    """Return the export for these configs, building it first if no complete one exists."""
    data_dir = Path(data_dir)
    name = export_name(source_cfg, storage_cfg)
    final = data_dir / name
    with _locked(data_dir / ".locks" / f"{name}.lock"):
        if (final / MANIFEST).is_file():
            exp = open_export(final)
            log.info("export: reusing %s", final)
            return exp
        if final.exists():  # no manifest: cannot be ours, never trust it
            raise ExportError(f"{final} exists but has no {MANIFEST}; delete it to re-export")
        for stale in data_dir.glob(f".tmp-{name}-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = data_dir / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        try:
            _build(tmp, source_cfg, storage_cfg, name)
            os.rename(tmp, final)
            _fsync_dir(data_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    exp = open_export(final)
    exp.reused = False
    return exp


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _build(tmp: Path, source_cfg, storage_cfg, name: str) -> None:
    t0 = time.perf_counter()
    source = build_source(source_cfg)
    spec = source.spec
    tmp.mkdir(parents=True)
    writer = get_format(storage_cfg.name).Writer(tmp, spec, storage_cfg)
    labels = np.empty(spec.num_samples, dtype=np.int64)
    digest = hashlib.sha256()
    done, next_report = 0, 0.1
    log.info(
        "export: writing %d samples of %s %s to %s",
        spec.num_samples,
        spec.shape,
        spec.dtype,
        tmp.parent / name,
    )
    for x, y in progress.samples(source.chunks(), spec.num_samples, "export"):
        x = np.ascontiguousarray(x, dtype=spec.dtype)
        if x.shape[1:] != spec.shape or len(x) != len(y):
            raise ExportError(
                f"source chunk has shape {x.shape} with {len(y)} labels; expected samples of {spec.shape}"
            )
        if done + len(y) > spec.num_samples:
            raise ExportError(f"source yielded more than the {spec.num_samples} samples it declared")
        writer.write(x, y)
        labels[done : done + len(y)] = y
        digest.update(x.tobytes())
        digest.update(np.asarray(y, dtype=np.int64).tobytes())
        done += len(y)
        if done >= next_report * spec.num_samples:
            secs = time.perf_counter() - t0
            log.info(
                "export: %d/%d samples (%.0f%%), %.1f MB/s",
                done,
                spec.num_samples,
                100 * done / spec.num_samples,
                done * spec.sample_bytes / 1e6 / max(secs, 1e-9),
            )
            next_report += 0.1
    writer.close()
    if done != spec.num_samples:
        raise ExportError(f"source yielded {done} samples, declared {spec.num_samples}")
    np.save(tmp / LABELS, labels, allow_pickle=False)
    os.sync()  # every sample on disk before the manifest says the export is complete
    count, total = _walk_files(tmp)
    manifest = {
        "layout_version": LAYOUT_VERSION,
        "fingerprint": name.rsplit("-", 1)[-1],
        "name": name,
        "source": _plain(source_cfg),
        "storage": _plain(storage_cfg),
        "num_samples": spec.num_samples,
        "shape": list(spec.shape),
        "dtype": spec.dtype,
        "num_classes": spec.num_classes,
        "class_names": list(spec.class_names),
        "content_sha256": digest.hexdigest(),
        "files": {"count": count, "bytes": total},
        "export_seconds": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    manifest_tmp = tmp / (MANIFEST + ".part")
    manifest_tmp.write_text(json.dumps(manifest, indent=1))
    with open(manifest_tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.rename(manifest_tmp, tmp / MANIFEST)
    _fsync_dir(tmp)
    log.info("export: %d samples, %.1f MB in %.2f s", done, total / 1e6, time.perf_counter() - t0)
