"""Publishing a complete local export to a bucket, and opening a published one.

    from pipeline.data.remote.publish import publish, open_remote, remote_manifest
    pub = publish(local_root, "s3://team-data/exports")   # -> s3://team-data/exports/<name>/
    pub.reused                                  # True: it was already published (nothing uploaded)
    remote_manifest("s3://team-data/exports", name)    # the manifest, or None if not published
    exp = open_remote("s3://team-data/exports", name, cache)  # small files local, shards via the cache
    exp.root / "labels.npy"; exp.fetch("shards/shard-00000.npy"); exp.release("shards/shard-00000.npy")

Layout in the bucket, for an export named ``<name>`` (``<source>-<storage>-<fingerprint>``)::

    <prefix>/<name>/manifest.json          the export's manifest + "remote": {"data": "v-<id>", ...}
    <prefix>/<name>/v-<id>/<relpath>        every file of the local export (files.json, labels.npy, ...)

The publish rule (docs/object-storage.md):

1. The manifest is written LAST and is the only thing that says an export exists: a listing or a reader
   that finds no ``<name>/manifest.json`` sees no export, whatever else is there.
2. Data objects are never overwritten by another build: each local build uploads under its own version
   folder ``v-<id>``, ``<id>`` being the first digits of the digest of its ``files.json`` (which records
   every file's size, mtime and sha256, so two builds differ). A manifest names its version folder and
   every object in it is complete before the manifest is written (each size is checked by a listing).
3. The manifest is written with S3's create-only condition (``If-None-Match: *``). Two jobs publishing
   the same export at once: the second's write fails, it deletes its own version folder and uses the
   first's. On a server that ignores the condition (s3rver; older MinIO/Ceph), both writes succeed and the
   last one stays -- still consistent, since each manifest points at its own complete version folder, and a
   reader that opened the first keeps reading complete objects (nothing referenced is ever deleted).
4. A killed publish leaves a version folder and no manifest. The next run with the same local build
   finishes it (objects already there with the same size and sha256 -- kept in the object's metadata --
   are skipped); a run with a new build publishes its own version. Version folders no manifest names are
   deleted by a later publish of that export once their newest object is older than ``orphan_grace_s``
   (default 1 h): a concurrent publisher's folder is always younger than that (rule 3 keeps its work).

Only complete local exports are published: the local manifest and the cheap integrity check
(``integrity.check_files``) come first, so nothing half-written leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline import fsio
from pipeline.data.integrity import FILE_LIST, MANIFEST, IntegrityError, check_files
from pipeline.data.remote.cache import ObjectCache
from pipeline.data.remote.errors import AlreadyExists, LocationError, ObjectNotFound
from pipeline.data.remote.store import PART_SIZE, ObjectStore, sha256_file
from pipeline.data.remote.urls import Location, parse_location
from pipeline.data.safe_paths import UnsafePath, safe_join, safe_name, safe_relpath

log = logging.getLogger(__name__)

VERSION_PREFIX = "v-"
SHA_META = "sha256"  # user metadata on every uploaded object
SHARD_NAMES = ("shard-",)  # files streamed through the cache; everything else is brought local at open


def is_streamed(rel: str) -> bool:
    """True for the export's data shards (``shards/shard-*.npy``, ``encoded/shard-*.bin``): fetched
    through the cache while reading; the other (small) files are brought local when the export is opened."""
    return rel.rsplit("/", 1)[-1].startswith(SHARD_NAMES)


@dataclass
class Published:
    url: str  # s3://bucket/prefix/<name>
    name: str
    version: str  # the version folder the manifest names
    reused: bool  # already published (by an earlier job or a concurrent one): nothing of ours kept
    uploaded_bytes: int = 0
    skipped_files: int = 0  # already uploaded by a killed run of the same build
    seconds: float = 0.0


def _remote_location(url: str | Location) -> Location:
    loc = url if isinstance(url, Location) else parse_location(url)
    if not loc.is_remote:
        raise LocationError(f"{url}: publishing needs an object-store location (s3://bucket/prefix)")
    return loc


def manifest_key(loc: Location, name: str) -> str:
    return loc.key(name, MANIFEST)


def remote_manifest(url: str | Location, name: str, store: ObjectStore | None = None) -> dict | None:
    """The published manifest of ``name`` under ``url``, or None when it is not (completely) published.
    A missing bucket or denied credentials raise (BucketNotFound, AccessDenied)."""
    loc = _remote_location(url)
    store = store or ObjectStore(loc.bucket)
    try:
        blob = store.get_bytes(manifest_key(loc, name))
    except ObjectNotFound:
        return None
    try:
        manifest = json.loads(blob)
        version = manifest["remote"]["data"]
    except (ValueError, KeyError, TypeError) as err:
        raise IntegrityError(
            f"{loc.url(name, MANIFEST)} is not a published manifest ({type(err).__name__}: {err}); delete "
            f"{loc.url(name)}/ to publish it again"
        ) from None
    if not (isinstance(version, str) and version.startswith(VERSION_PREFIX) and "/" not in version):
        raise IntegrityError(f"{loc.url(name, MANIFEST)} names an invalid version folder {version!r}")
    return manifest


def _local_files(root: Path) -> tuple[dict, dict[str, list]]:
    """The local export's manifest and its file list (checked: complete, nothing changed since export)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise IntegrityError(
            f"{root} is not a complete export ({MANIFEST} is missing): nothing published"
        ) from None
    files = check_files(root, manifest)  # relpath -> [size, mtime_ns, sha256]
    return manifest, files


def publish(
    local_root: str | Path,
    url: str | Location,
    *,
    store: ObjectStore | None = None,
    threads: int = 4,
    part_size: int = PART_SIZE,
    orphan_grace_s: float = 3600.0,
) -> Published:
    """Upload the complete export at ``local_root`` to ``url``/<its name>/ (the rule in the module doc)."""
    t0 = time.perf_counter()
    root = Path(local_root)
    loc = _remote_location(url)
    manifest, files = _local_files(root)
    try:
        name = safe_name(manifest["name"])
    except (KeyError, UnsafePath) as err:
        raise IntegrityError(
            f"{root / MANIFEST} has no usable export name ({err}); nothing published"
        ) from None
    store = store or ObjectStore(loc.bucket, max_connections=max(16, threads * 4))
    store.check_bucket()
    if remote_manifest(loc, name, store) is not None:
        log.info("publish: %s is already published; reusing it", loc.url(name))
        return _existing(loc, name, store, t0)
    list_blob = (root / FILE_LIST).read_bytes()
    version = VERSION_PREFIX + manifest["files"]["list_sha256"][:16]
    prefix = loc.key(name, version)
    todo = {FILE_LIST: (len(list_blob), manifest["files"]["list_sha256"])}
    todo.update({rel: (v[0], v[2]) for rel, v in files.items()})
    have = {o.key: o.size for o in store.list(prefix + "/")}

    def upload(rel: str) -> tuple[int, int]:
        """(bytes uploaded, 1 if it was already there)."""
        size, digest = todo[rel]
        key = f"{prefix}/{rel}"
        if have.get(key) == size and store.head(key).metadata.get(SHA_META) == digest:
            return 0, 1  # uploaded by a killed run of this same build
        n = store.put_file(
            key, root / rel, part_size=part_size, threads=max(1, threads // 2), metadata={SHA_META: digest}
        )
        return n, 0

    log.info(
        "publish: uploading %d files (%.1f MB) to %s/",
        len(todo),
        sum(s for s, _ in todo.values()) / 1e6,
        loc.url(name, version),
    )
    order = sorted(todo, key=lambda rel: -todo[rel][0])  # largest first: the pool's tail is short
    with ThreadPoolExecutor(max(1, threads)) as pool:
        done = list(pool.map(upload, order))
    uploaded, skipped = sum(n for n, _ in done), sum(k for _, k in done)
    _check_uploaded(store, loc, name, prefix, todo)

    remote = dict(manifest)
    remote["remote"] = {"data": version, "published": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    blob = json.dumps(remote, indent=1).encode()
    if remote_manifest(loc, name, store) is not None:  # someone finished first: theirs stands
        return _lost(loc, name, version, prefix, store, t0)
    try:
        store.put_bytes(manifest_key(loc, name), blob, create_only=True, metadata={SHA_META: _sha(blob)})
    except AlreadyExists:
        return _lost(loc, name, version, prefix, store, t0)
    log.info(
        "publish: %s complete (%s, %.1f MB uploaded, %d files already there)",
        loc.url(name),
        version,
        uploaded / 1e6,
        skipped,
    )
    collect_orphans(loc, name, store, grace_s=orphan_grace_s)
    return Published(loc.url(name), name, version, False, uploaded, skipped, time.perf_counter() - t0)


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _check_uploaded(store: ObjectStore, loc: Location, name: str, prefix: str, todo: dict) -> None:
    """Every file is in the bucket with its size (a listing) before the manifest may name the folder."""
    listed = {o.key: o.size for o in store.list(prefix + "/")}
    wrong = [
        f"{rel} ({listed.get(f'{prefix}/{rel}', 'missing')} bytes, {size} expected)"
        for rel, (size, _) in todo.items()
        if listed.get(f"{prefix}/{rel}") != size
    ]
    if wrong:
        raise IntegrityError(
            f"publish of {loc.url(name)}: after upload the bucket lacks or has other sizes for "
            f"{len(wrong)} file(s): {'; '.join(wrong[:5])}; nothing was published, run it again"
        )


def _existing(loc: Location, name: str, store: ObjectStore, t0: float) -> Published:
    manifest = remote_manifest(loc, name, store)
    return Published(loc.url(name), name, manifest["remote"]["data"], True, 0, 0, time.perf_counter() - t0)


def _lost(loc, name, version, prefix, store, t0) -> Published:
    """Another job published ``name`` while we uploaded: remove our version folder, unless it is theirs."""
    winner = remote_manifest(loc, name, store)
    if winner is not None and winner["remote"]["data"] != version:
        store.delete_many(o.key for o in store.list(prefix + "/"))
    log.info("publish: %s was published by another job meanwhile; using it", loc.url(name))
    return _existing(loc, name, store, t0)


def collect_orphans(loc: Location, name: str, store: ObjectStore, grace_s: float = 3600.0) -> list[str]:
    """Delete the version folders of ``name`` its manifest does not name and that nobody has written to
    for ``grace_s`` seconds (killed publishes; the losers of a race on a server without conditional
    writes). The folders deleted."""
    manifest = remote_manifest(loc, name, store)
    if manifest is None:
        return []
    keep = loc.key(name, manifest["remote"]["data"]) + "/"
    now = time.time()
    gone = []
    for folder in store.list_prefixes(loc.key(name) + "/"):
        if folder == keep or not folder.rsplit("/", 2)[-2].startswith(VERSION_PREFIX):
            continue
        objs = list(store.list(folder))
        if objs and now - max(o.last_modified for o in objs) < grace_s:
            log.info(
                "publish: leaving %s (written to %.0f s ago; may be a live publish)",
                folder,
                now - max(o.last_modified for o in objs),
            )
            continue
        store.delete_many(o.key for o in objs)
        gone.append(folder)
        log.info("publish: deleted the unpublished version folder s3://%s/%s", store.bucket, folder)
    return gone


@dataclass
class RemoteExport:
    """A published export opened for reading: ``root`` holds its manifest and small files (as a local
    export's folder does, minus the shards); ``fetch`` brings a shard through the cache."""

    url: str
    name: str
    version: str
    manifest: dict
    files: dict  # relpath -> (size, sha256)
    root: Path
    cache: ObjectCache
    prefix: str  # object key of the version folder

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{safe_relpath(rel)}"

    def item(self, rel: str) -> tuple[str, int, str]:
        """``(key, size, sha256)`` of ``rel``: what ``ObjectCache.fetch``/``prefetch`` take."""
        try:
            size, digest = self.files[rel]
        except KeyError:
            raise IntegrityError(f"{self.url}: {rel} is not a file of this export") from None
        return self.key(rel), size, digest

    def fetch(self, rel: str) -> Path:
        """A verified local copy of the export's file ``rel`` (pinned until ``release(rel)``)."""
        return self.cache.fetch(*self.item(rel))

    def prefetch(self, rels) -> None:
        self.cache.prefetch(self.item(rel) for rel in rels)

    def release(self, rel: str) -> None:
        self.cache.release(self.key(rel))

    @property
    def shards(self) -> list[str]:
        return sorted(rel for rel in self.files if is_streamed(rel))


def open_remote(url: str | Location, name: str, cache: ObjectCache) -> RemoteExport:
    """Open the export ``name`` published under ``url``: its manifest, files.json (checked against the
    manifest's digest) and every small file (``is_streamed`` false) verified into a local folder under the
    cache (``<cache>/exports/<name>/<version>/``, its manifest written last); shards stay remote, fetched
    through ``cache``. ObjectNotFound naming the URL when no such export is published."""
    loc = _remote_location(url)
    store = cache.store
    if store.bucket != loc.bucket:
        raise LocationError(f"{loc.url()}: the cache reads bucket {store.bucket!r}, not {loc.bucket!r}")
    manifest = remote_manifest(loc, name, store)
    if manifest is None:
        store.check_bucket()
        raise ObjectNotFound(
            f"no export {name} is published at {loc.url()} ({loc.url(name, MANIFEST)} does not exist; a "
            "publish that has not finished has no manifest yet)"
        )
    version = manifest["remote"]["data"]
    prefix = loc.key(name, version)
    root = cache.folder / "exports" / name / version
    with fsio.locked(cache.folder / "exports" / f".{name}.lock"):
        if not (root / MANIFEST).is_file():
            _bring_local(store, loc, name, manifest, prefix, root)
    files = _file_list(root, manifest, loc.url(name))
    return RemoteExport(loc.url(name), name, version, manifest, files, root, cache, prefix)


def _file_list(root: Path, manifest: dict, url: str) -> dict:
    blob = (root / FILE_LIST).read_bytes()
    if _sha(blob) != manifest["files"]["list_sha256"]:
        raise IntegrityError(f"{url}: {FILE_LIST} does not match the manifest's digest; publish it again")
    out = {}
    for rel, (size, _mtime, digest) in json.loads(blob)["files"].items():
        try:
            out[safe_relpath(rel)] = (int(size), str(digest))
        except UnsafePath as err:
            raise IntegrityError(f"{url}: {FILE_LIST} lists an unsafe path: {err}") from None
    return out


def _bring_local(
    store: ObjectStore, loc: Location, name: str, manifest: dict, prefix: str, root: Path
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    blob = store.get_bytes(f"{prefix}/{FILE_LIST}")
    fsio.atomic_write(root / FILE_LIST, blob)
    files = _file_list(root, manifest, loc.url(name))
    small = [rel for rel in files if not is_streamed(rel)]

    def get(rel: str) -> None:
        size, digest = files[rel]
        dest = safe_join(root, rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):
            store.get_to_file(f"{prefix}/{rel}", dest, size=size)
            if sha256_file(dest) == digest:
                return
            log.warning(
                "%s: checksum mismatch, fetching it again", loc.url(name, manifest["remote"]["data"], rel)
            )
        dest.unlink(missing_ok=True)
        raise IntegrityError(
            f"{loc.url(name, manifest['remote']['data'], rel)} does not match its sha256 in {FILE_LIST}, "
            "also "
            "when fetched a second time: the object was damaged or replaced; publish the export again"
        )

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(get, small))
    fsio.atomic_write(root / MANIFEST, json.dumps(manifest, indent=1))  # last: the folder is complete
