"""Export stage: write a source's samples to disk in a storage format, once.

    from pipeline.data.export import export
    exp = export(cfg.source, cfg.storage, data_dir="outputs/data", export_cfg=cfg.export)
    exp.root, exp.spec, exp.labels, exp.reused, exp.throughput

The export is ``<data_dir>/<source>-<storage>-<fingerprint>/`` (the fingerprint hashes both configs
and the layout version). It is built in a hidden temporary folder and renamed into place complete and
synced, under a per-export lock: a folder with that name is always complete, concurrent jobs build it
once, and a complete export is reused, never rewritten. Its files are checked on every open
(pipeline/data/integrity.py). A build killed half-way leaves only its temp folder, which the next build
(holding the lock) deletes before starting again.

``export_cfg`` (the ``export`` config node: ``workers``, ``engine``, ``address``) says where the work runs
(pipeline/data/engines/; the write loop: pipeline/data/writing.py). It is not part of the fingerprint: the
files and ``content_sha256`` are the same for any number of workers and any engine. The manifest's
``throughput`` records how this build ran: workers, engine, samples/s and MB/s over the build's seconds.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from pipeline import fsio
from pipeline.data import quantize
from pipeline.data.integrity import MANIFEST, ExportError, IntegrityError, check_files, write_file_list
from pipeline.data.readers.files import LOCAL, ExportFiles
from pipeline.data.sources import SampleSpec, get_source
from pipeline.data.storage import get_format

log = logging.getLogger(__name__)

LAYOUT_VERSION = 2  # 2: files.json with per-file digests
LABELS = "labels.npy"
# content_sha256: SHA-256 of the samples' SHA-256s (stored bytes + int64 label) in id order (data/writing.py)
CONTENT_DIGEST = "sha256 of per-sample sha256s"


MANIFEST_KEYS = ("fingerprint", "name", "source", "storage", "num_samples", "shape", "dtype", "num_classes")


@dataclass
class Export:
    root: Path
    manifest: dict
    labels: np.ndarray
    reused: bool
    files: ExportFiles = LOCAL  # where the data files are read from: this disk, or a bucket through a cache
    url: str | None = None  # s3://... when the export lives in object storage

    @property
    def spec(self) -> SampleSpec:
        m = self.manifest
        return SampleSpec(
            num_samples=m["num_samples"],
            shape=tuple(m["shape"]),
            dtype=m["dtype"],
            num_classes=m["num_classes"],
            class_names=tuple(m["class_names"]),
            divisor=m.get("values", {}).get("divisor"),  # uint8 storage's mapping (data/quantize.py)
        )

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def throughput(self) -> dict | None:
        """How the build ran (workers, engine, samples_per_s, mb_per_s); None for older exports."""
        return self.manifest.get("throughput")

    @property
    def stored_sample_bytes(self) -> float:
        """Bytes a sample takes as stored: ``spec.sample_bytes``, or the mean record of a format that
        compresses (encoded). What a read's amplification is measured against."""
        return float(self.manifest.get("stored_sample_bytes", self.spec.sample_bytes))

    def dataset(self, ids: np.ndarray, storage_cfg=None):
        """A map-style Dataset over the sample ids ``ids`` of this export."""
        fmt = get_format(self.manifest["storage"]["name"])
        return fmt.dataset(self.root, self.spec, self.labels, ids, storage_cfg, files=self.files)


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def write_options(storage_cfg) -> dict:
    """The storage config minus the format's read-time options (``read_options``), which the
    files on disk do not depend on: changing one reuses the export."""
    plain = _plain(storage_cfg)
    skip = get_format(plain["name"]).read_options
    return {k: v for k, v in plain.items() if k not in skip}


def format_identity(storage_cfg) -> dict | None:
    """What a format's files depend on beyond its config (``StorageFormat.identity``: encoded records its
    decoder's version); None for most formats."""
    plain = _plain(storage_cfg)
    return get_format(plain["name"]).identity(plain)


def fingerprint(source_cfg, storage_cfg, identity: dict | None = None) -> str:
    """The export's hash; ``identity``: the format identity a manifest recorded (default: this machine's)."""
    storage = write_options(storage_cfg)
    if storage.get("dtype", "source") == "source":  # the stored dtype; the default keeps older names
        storage.pop("dtype", None)
    payload = {
        "layout": LAYOUT_VERSION,
        "source": _plain(source_cfg),
        "storage": storage,
    }
    layout = get_format(_plain(storage_cfg)["name"]).layout
    if layout is not None:  # a format's own layout version (shards 2: samples placed in a seeded permutation)
        payload["format_layout"] = layout
    identity = identity if identity is not None else format_identity(storage_cfg)
    if identity is not None:  # e.g. encoded's codec and decoder version
        payload["format_identity"] = identity
    identity = get_source(_plain(source_cfg)["name"]).identity(source_cfg)  # e.g. an image folder's files
    if identity is not None:
        payload["source_identity"] = identity
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def export_name(source_cfg, storage_cfg) -> str:
    return f"{source_cfg.name}-{storage_cfg.name}-{fingerprint(source_cfg, storage_cfg)}"


def _config_only(source: dict) -> bool:
    """True when the source's data is defined by its config alone (``SourceKind.defined_by_config``)."""
    from pipeline.data.sources import sources

    kind = sources().get(source.get("name"))
    return kind is not None and kind.defined_by_config


def open_export(root: Path, verify: bool = False) -> Export:
    """Open a published export: its manifest, its files (cheap checks; digests with ``verify``), labels.

    Raises IntegrityError naming what disagrees; training must never start on such data.
    """
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ExportError(f"{root} is not a complete export: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{manifest_path} is not valid JSON: {err}") from err
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise IntegrityError(f"{manifest_path} lacks {missing}; delete {root} to re-export")
    want = manifest["fingerprint"]
    if _config_only(manifest["source"]):  # sources with an identity (a folder listing) are not re-scanned
        want = fingerprint(manifest["source"], manifest["storage"], manifest.get("format_identity"))
    if manifest["fingerprint"] != want or manifest["name"] != root.name or not root.name.endswith(want):
        raise IntegrityError(
            f"{manifest_path} disagrees with its folder: its source/storage configs hash to {want}, "
            f"manifest fingerprint {manifest['fingerprint']}, folder {root.name}; delete {root} to re-export"
        )
    files = check_files(root, manifest, verify=verify)
    spec = Export(root, manifest, np.empty(0), True).spec
    get_format(manifest["storage"]["name"]).check(root, spec, {rel: v[0] for rel, v in files.items()})
    try:
        labels = np.load(root / LABELS, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise IntegrityError(f"{root / LABELS} cannot be read: {err}") from err
    if labels.shape != (manifest["num_samples"],) or labels.dtype.kind not in "iu":
        raise IntegrityError(
            f"{root / LABELS} holds {labels.shape} {labels.dtype} labels, manifest says "
            f"{manifest['num_samples']} integer labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= manifest["num_classes"]):
        raise IntegrityError(
            f"{root / LABELS} holds labels outside [0, {manifest['num_classes']}) (manifest num_classes)"
        )
    return Export(root=root, manifest=manifest, labels=labels, reused=True)


def export(source_cfg, storage_cfg, data_dir, verify: bool = False, export_cfg=None) -> Export:
    """Return the export for these configs, building it first if no complete one exists (its work where
    ``export_cfg`` says; None: in this process).

    A reused export is checked (cheaply, or every digest with ``verify``); a build that fails for lack
    of space or permission raises ExportError saying so, and leaves nothing under the published name.
    """
    data_dir = Path(data_dir)
    name = export_name(source_cfg, storage_cfg)
    final = data_dir / name
    lock_path = data_dir / ".locks" / f"{name}.lock"
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        open(lock_path, "a").close()
    except OSError as err:
        raise ExportError(
            f"cannot write to the data dir {data_dir}: {err.strerror or err} ({err.filename}); "
            "set paths.data_dir to a writable folder"
        ) from err
    with fsio.locked(lock_path, on_wait=lambda: log.info("waiting for another process to build %s", name)):
        if (final / MANIFEST).is_file():
            exp = open_export(final, verify=verify)
            log.info("export: reusing %s%s", final, " (every digest verified)" if verify else "")
            return exp
        if final.exists():  # no manifest: cannot be ours, never trust it
            raise ExportError(f"{final} exists but has no {MANIFEST}; delete it to re-export")
        for stale in data_dir.glob(f".tmp-{name}-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = data_dir / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        try:
            _build(tmp, source_cfg, storage_cfg, name, export_cfg)
            os.rename(tmp, final)
            fsio.fsync_dir(data_dir)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, OSError):
                raise ExportError(_write_failure(err, data_dir, final)) from err
            raise
    exp = open_export(final)  # just hashed from disk: the cheap check is enough
    exp.reused = False
    return exp


def _write_failure(err: OSError, data_dir: Path, final: Path) -> str:
    why = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EFBIG: "a file exceeds the size limit",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "the file system is read-only",
    }.get(err.errno, "a write failed")
    try:
        free = f"{shutil.disk_usage(data_dir).free / 1e6:.1f} MB free in {data_dir}"
    except OSError:
        free = f"free space in {data_dir} unknown"
    return (
        f"export of {final.name} failed: {why} ({err.strerror or err}: {err.filename}; {free}). "
        "The partial export was removed and nothing was published; free space or fix permissions "
        "(or set paths.data_dir) and rerun"
    )


def _build(tmp: Path, source_cfg, storage_cfg, name: str, export_cfg=None) -> None:
    from pipeline.data.engines import open_engine
    from pipeline.data.writing import write_samples

    t0 = time.perf_counter()
    kind = get_source(source_cfg.name)
    with open_engine(export_cfg) as engine:
        if engine.in_process:
            source = kind.build(source_cfg)
        else:  # the source's own work of building (an image folder's check) on the workers too
            source = kind.build_parallel(source_cfg, engine.pmap, engine.workers)
        spec = source.spec
        divisor = None  # storage.dtype=uint8: 8-bit codes of the source's values (pipeline/data/quantize.py)
        if str(storage_cfg.get("dtype", "source")) == "uint8":
            divisor = quantize.divisor_for(source_cfg)
            spec = dataclasses.replace(spec, dtype="uint8", divisor=divisor)
        elif spec.dtype == "uint8":
            divisor = quantize.DEFAULT_DIVISOR
        need, free = spec.num_samples * spec.sample_bytes, shutil.disk_usage(tmp.parent).free
        if need > free:  # a lower bound (formats add overhead): refuse before writing anything
            raise ExportError(
                f"not enough disk space for {name}: its {spec.num_samples} samples need at least "
                f"{need / 1e6:.1f} MB, {free / 1e6:.1f} MB free in {tmp.parent}; free space or set "
                "paths.data_dir"
            )
        tmp.mkdir(parents=True)
        writer = get_format(storage_cfg.name).writer(tmp, spec, storage_cfg)
        log.info("export: writing to %s", tmp.parent / name)
        written = write_samples(engine, kind, source_cfg, source, spec, divisor, writer, tmp)
    done = written.done
    np.save(tmp / LABELS, written.labels, allow_pickle=False)
    fsio.sync_tree(tmp)  # every sample on disk before the manifest says the export is complete
    writer.after_sync()  # a format's step once its files are on disk (shards: uncache them)
    files = write_file_list(tmp, writer.digests)  # size, mtime, sha256 per file
    extra = {}
    if divisor is not None:  # uint8 codes: the values they stand for
        extra["values"] = quantize.mapping(divisor)
    identity = format_identity(storage_cfg)
    if identity is not None:  # encoded: codec and decoder version (in the fingerprint too)
        extra["format_identity"] = identity
    if writer.stored_bytes:  # a format that compresses: mean bytes per stored sample
        extra["stored_sample_bytes"] = writer.stored_bytes / max(done, 1)
    seconds = time.perf_counter() - t0
    manifest = {
        "layout_version": LAYOUT_VERSION,
        "fingerprint": name.rsplit("-", 1)[-1],
        "name": name,
        "source": _plain(source_cfg),
        "storage": write_options(storage_cfg),
        "num_samples": spec.num_samples,
        "shape": list(spec.shape),
        "dtype": spec.dtype,
        "num_classes": spec.num_classes,
        "class_names": list(spec.class_names),
        **extra,
        "content_sha256": written.content_sha256,
        "content_digest": CONTENT_DIGEST,
        "files": files,
        "export_seconds": round(seconds, 3),
        "throughput": {
            "workers": written.workers,
            "engine": written.engine,
            "samples_per_s": round(done / seconds, 1),
            "mb_per_s": round(files["bytes"] / 1e6 / seconds, 2),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    fsio.atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1))
    log.info(
        "export: %d samples, %.1f MB in %.2f s (%.0f samples/s, %.1f MB/s, %s)",
        done,
        files["bytes"] / 1e6,
        seconds,
        done / seconds,
        files["bytes"] / 1e6 / seconds,
        f"{written.workers} workers, {written.engine}" if written.engine != "serial" else "serial",
    )
