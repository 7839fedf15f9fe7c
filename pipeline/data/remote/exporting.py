"""The export stage when ``paths.data_dir`` is a bucket: build locally, publish, read through the cache.

    from pipeline.data.remote.exporting import export_to_bucket
    exp = export_to_bucket(cfg.source, cfg.storage, "s3://team/exports", cfg.paths.cache_dir)
    exp.url, exp.reused, exp.files          # s3://team/exports/<name>; a published export found; RemoteFiles

1. The bucket is checked first (``BucketNotFound`` / ``AccessDenied`` naming the URL and what to check), so
   a wrong bucket or credentials fail before any data work.
2. An export already published under that name (its manifest exists: published completely) is reused,
   found by its fingerprint as on a local disk.
3. Otherwise it is built exactly as a local export (pipeline/data/export.py: temp folder, lock, manifest
   last) under ``<cache_dir>/staging``, then published (pipeline/data/remote/publish.py: data files in
   parallel, multipart for large ones, the manifest last and create-only; two jobs publishing at once do
   not corrupt each other; a publish killed half-way is finished by the next run from the same local
   build), and the local build is removed: the bucket holds the export from then on.
4. It is opened for reading (``open_remote``): the manifest and small files local under the cache folder,
   the shards fetched through the shard cache (``ObjectCache``, bounded by ``storage.cache_limit_mb`` plus
   one shard, shared by every process of the machine) as the readers need them (``RemoteFiles``).

Only ``storage=shards`` and ``storage=encoded`` live in a bucket (pipeline/config/validate.py says why for
the others): their readers read whole shards in sequential buffers, which is what a GET of an object is.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CACHE_FOLDER = "shards"  # under paths.cache_dir: the shard cache (objects/, partial/, pins/, ...)
STAGING_FOLDER = "staging"  # under paths.cache_dir: exports built before they are published


def cache_for(store, cache_dir, limit_mb: float):
    from pipeline.data.remote.cache import ObjectCache

    return ObjectCache(store, Path(cache_dir) / CACHE_FOLDER, limit_bytes=int(limit_mb * 1e6))


def export_to_bucket(
    source_cfg, storage_cfg, data_dir: str, cache_dir, verify: bool = False, export_cfg=None
):
    from pipeline.data.export import LABELS, Export, export, export_name
    from pipeline.data.integrity import IntegrityError
    from pipeline.data.remote.files import RemoteFiles
    from pipeline.data.remote.publish import open_remote, publish, remote_manifest
    from pipeline.data.remote.store import ObjectStore
    from pipeline.data.remote.urls import parse_location

    loc = parse_location(data_dir)
    store = ObjectStore(loc.bucket)
    store.check_bucket()  # a missing bucket or denied credentials: before any data work
    name = export_name(source_cfg, storage_cfg)
    reused = remote_manifest(loc, name, store) is not None
    if not reused:
        staging = Path(cache_dir) / STAGING_FOLDER
        local = export(source_cfg, storage_cfg, staging, verify=verify, export_cfg=export_cfg)
        log.info("export: publishing %s to %s", local.root.name, loc.url(name))
        pub = publish(local.root, loc)
        log.info(
            "export: %s %s (%.1f MB uploaded in %.1f s)",
            "found" if pub.reused else "published",
            pub.url,
            pub.uploaded_bytes / 1e6,
            pub.seconds,
        )
        shutil.rmtree(local.root, ignore_errors=True)  # the bucket holds it now
        reused = pub.reused
    limit_mb = float(storage_cfg.get("cache_limit_mb", 4096.0))
    remote = open_remote(loc, name, cache_for(store, cache_dir, limit_mb))
    try:
        labels = np.load(remote.root / LABELS, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise IntegrityError(f"{remote.url}/{LABELS} cannot be read: {err}") from err
    manifest = {k: v for k, v in remote.manifest.items() if k != "remote"}
    if len(labels) != manifest["num_samples"]:
        raise IntegrityError(
            f"{remote.url}/{LABELS} holds {len(labels)} labels, the manifest {manifest['num_samples']}"
        )
    return Export(remote.root, manifest, labels, reused, files=RemoteFiles(remote), url=remote.url)
