"""A small object-store API over one S3 bucket: what export, publish and the cache need, nothing more.

    from pipeline.data.remote.store import ObjectStore
    store = ObjectStore("team-data")                 # endpoint and credentials from the environment
    store.check_bucket()                             # BucketNotFound / AccessDenied before any work
    store.put_file("exports/x/shard-00000.npy", path, metadata={"sha256": digest})  # multipart if large
    store.put_bytes("exports/x/manifest.json", blob, create_only=True)  # AlreadyExists if someone was first
    store.get_to_file("exports/x/shard-00000.npy", dest)   # atomic: dest is absent or complete
    store.get_range(key, start, end); store.get_bytes(key); store.head(key); store.list(prefix)
    store.delete(key); store.delete_many(keys)

The client is boto3 (docs/object-storage.md has the measurements and the retry comparison that chose
it): the endpoint comes from ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` and the credentials from the
AWS credential chain (environment, ``AWS_PROFILE`` and ``~/.aws`` files, SSO, container and instance
roles) -- botocore reads them itself; nothing here takes a credential as an argument or prints one.
Against a custom endpoint (MinIO, Ceph, s3rver, moto) requests use path-style addressing.

Retries are ``retry.RetryPolicy``'s alone (botocore's own are switched off, so one budget bounds an
operation): connection faults, timeouts, 5xx and throttling are retried with full jitter; a body cut
short mid-read is resumed with a ranged GET from the byte reached (``If-Match`` on the first answer's
ETag, so an object replaced meanwhile is not stitched from two versions). Large reads and writes go in
parts of ``part_size`` bytes, ``threads`` at a time (ranged GETs written with ``pwrite``; multipart PUTs,
aborted on failure). Every error leaving this module is a ``pipeline.data.remote.errors`` error naming
the URL and what to check.

A store is safe to share between threads; in a forked or spawned process (DataLoader workers) it makes
its own connection pool on first use (a pickled store carries only its settings).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.remote.errors import (
    AccessDenied,
    AlreadyExists,
    BucketNotFound,
    CorruptObject,
    ObjectNotFound,
    RemoteError,
    RemoteUnavailable,
)
from pipeline.data.remote.retry import Exhausted, RetryPolicy, error_code, http_status
from pipeline.data.remote.urls import check_bucket

log = logging.getLogger(__name__)

MIB = 2**20
PART_SIZE = 8 * MIB
MIN_PART = 5 * MIB  # S3's smallest part (all but the last)
MAX_PARTS = 10_000
CHUNK = 4 * MIB  # body read size: the unit a cut body resumes from
_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AccountProblem",
    "InvalidSecurity",
    "403",
    "Forbidden",
}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "Not Found"}
_CREDENTIALS_HINT = (
    "check the AWS credential chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws, "
    "an instance or container role) and that it may use this bucket"
)


def endpoint_url() -> str | None:
    """The S3 endpoint the environment names (``AWS_ENDPOINT_URL_S3`` first), or None for AWS."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _endpoint_words() -> str:
    ep = endpoint_url()
    return f"the endpoint {ep}" if ep else "AWS S3 (no AWS_ENDPOINT_URL set)"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str = ""
    last_modified: float = 0.0  # seconds since the epoch
    metadata: dict = field(default_factory=dict)


class ObjectStore:
    """One bucket. ``max_connections``: HTTP connections kept (>= the parallel requests you make);
    ``retry``: the budget for transient faults; timeouts in seconds (a stalled read fails after
    ``read_timeout`` and is retried)."""

    library = "boto3"

    def __init__(
        self,
        bucket: str,
        *,
        max_connections: int = 16,
        retry: RetryPolicy | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
    ) -> None:
        self.bucket = check_bucket(bucket, f"s3://{bucket}")
        self.max_connections = max_connections
        self.retry = retry or RetryPolicy()
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._client = None
        self._pid = None
        self._lock = threading.Lock()
        import boto3

        self.library = f"boto3 {boto3.__version__}"

    # --- plumbing -------------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_client=None, _pid=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def client(self):
        if self._client is None or self._pid != os.getpid():  # a forked child makes its own pool
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    self._client, self._pid = self._make_client(), os.getpid()
        return self._client

    def _make_client(self):
        import boto3
        from botocore.config import Config

        options = dict(
            max_pool_connections=self.max_connections,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retries={"total_max_attempts": 1},  # retry.py is the one retry policy
            user_agent_extra="ooc-pipeline",
        )
        if endpoint_url():  # S3-compatible servers: path-style (bucket.127.0.0.1 does not resolve)
            options["s3"] = {"addressing_style": "path"}
        # Checksums beyond what S3 requires cost CPU and break older S3-compatible servers; the cache
        # verifies every object's sha256 anyway. The standard settings still override this.
        if "AWS_REQUEST_CHECKSUM_CALCULATION" not in os.environ:
            options["request_checksum_calculation"] = "when_required"
        if "AWS_RESPONSE_CHECKSUM_VALIDATION" not in os.environ:
            options["response_checksum_validation"] = "when_required"
        return boto3.session.Session().client("s3", config=Config(**options))

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def _call(self, what: str, key: str, fn, *, missing_ok: bool = False):
        """``fn()`` under the retry policy, its errors mapped to the project's."""
        try:
            return self.retry.call(fn, f"{what} {self.url(key)}")
        except Exception as err:  # noqa: BLE001 -- mapped, never swallowed
            raise self._mapped(err, what, key) from err

    def _mapped(self, err: BaseException, what: str, key: str) -> BaseException:
        if isinstance(err, RemoteError):
            return err
        url = self.url(key)
        if isinstance(err, Exhausted):
            return RemoteUnavailable(
                f"{what} {url}: {_endpoint_words()} kept failing for {err.seconds:.0f} s over {err.attempts} "
                f"attempts (last: {type(err.last).__name__}: {str(err.last).splitlines()[0][:200]}); check "
                "that the endpoint is reachable (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3) or allow a longer "
                "retry budget"
            )
        name = type(err).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
            return AccessDenied(
                f"{what} {url}: no usable AWS credentials were found ({name}); {_CREDENTIALS_HINT}"
            )
        if name in ("ProfileNotFound", "ConfigNotFound", "InvalidConfigError"):
            return AccessDenied(f"{what} {url}: the AWS configuration is unusable ({name}: {err})")
        code, status = error_code(err), http_status(err)
        if code == "NoSuchBucket":
            return BucketNotFound(self._no_bucket(url))
        if code in _DENIED or status == 403:
            # the server's message is not repeated: some echo the access key id they were given
            return AccessDenied(f"{what} {url}: access denied ({code or status}); {_CREDENTIALS_HINT}")
        if code in _NOT_FOUND or status == 404:
            return ObjectNotFound(f"{url} does not exist")
        if code in ("PreconditionFailed", "412") or status == 412:
            return AlreadyExists(f"{what} {url}: precondition failed (the object exists or changed)")
        if name == "EndpointConnectionError" or isinstance(err, (ConnectionError, TimeoutError)):
            return RemoteUnavailable(f"{what} {url}: cannot reach {_endpoint_words()}: {err}")
        detail = f"{code or name}" + (f" (HTTP {status})" if status else "")
        return RemoteError(f"{what} {url} failed: {detail}: {str(err).splitlines()[0][:300]}")

    def _no_bucket(self, url: str) -> str:
        return (
            f"the bucket {self.bucket!r} does not exist at {_endpoint_words()} ({url}); check the bucket "
            "name "
            "and AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3"
        )

    # --- whole-bucket ---------------------------------------------------------------------------------
    def check_bucket(self) -> None:
        """Raise BucketNotFound or AccessDenied (naming the bucket and what to check) unless usable."""
        try:
            self._call("HEAD", "", lambda: self.client.head_bucket(Bucket=self.bucket))
        except ObjectNotFound:
            raise BucketNotFound(self._no_bucket(self.url())) from None

    # --- reads ----------------------------------------------------------------------------------------
    def head(self, key: str) -> ObjectInfo:
        try:
            r = self._call("HEAD", key, lambda: self.client.head_object(Bucket=self.bucket, Key=key))
        except ObjectNotFound:
            self.check_bucket()  # a HEAD's 404 does not say whether the bucket or the key is missing
            raise
        return ObjectInfo(
            key=key,
            size=int(r["ContentLength"]),
            etag=r.get("ETag", ""),
            last_modified=r["LastModified"].timestamp() if r.get("LastModified") else 0.0,
            metadata=dict(r.get("Metadata") or {}),
        )

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFound:
            return False
        return True

    def get_bytes(self, key: str) -> bytes:
        """The whole object (one GET; resumed from the byte reached if the body is cut short)."""
        chunks: list[bytes] = []
        self._read(key, 0, None, lambda off, data: chunks.append(data))
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object (fewer if it is shorter)."""
        if end <= start:
            return b""
        chunks: list[bytes] = []  # one read for a range up to 64 MiB: no copy (a cut range starts over)
        self._read(key, start, end, lambda off, data: chunks.append(data), chunk=min(end - start, 64 * MIB))
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def get_to_file(
        self,
        key: str,
        dest: str | Path,
        *,
        size: int | None = None,
        part_size: int = PART_SIZE,
        threads: int = 4,
    ) -> int:
        """Download to ``dest`` atomically (a temp file beside it, renamed over it when complete);
        the bytes written. ``size`` (if known) saves a HEAD; parts of ``part_size`` go ``threads`` at once."""
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            with open(tmp, "wb") as fh:
                n = self.download_into(fh.fileno(), key, size=size, part_size=part_size, threads=threads)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return n

    def download_into(
        self,
        fd: int,
        key: str,
        *,
        size: int | None = None,
        part_size: int = PART_SIZE,
        threads: int = 4,
        hasher=None,
    ) -> int:
        """Write the object into the open file ``fd`` (at offset 0, with ``pwrite``); the bytes written.
        The file is truncated to the object's size. ``hasher`` (a ``hashlib`` object): fed the bytes in
        order as they arrive -- one stream, no parts -- so the caller need not read the file back."""
        etag = None
        if size is None:
            info = self.head(key)
            size, etag = info.size, info.etag
        os.ftruncate(fd, size)

        def write(off: int, data: bytes) -> None:
            os.pwrite(fd, data, off)
            if hasher is not None:
                hasher.update(data)

        if size <= part_size or threads <= 1 or hasher is not None:
            got = self._read(key, 0, size if size else None, write, etag)
        else:
            ranges = [(a, min(a + part_size, size)) for a in range(0, size, part_size)]
            if etag is None:  # every part from one version of the object: pin the first answer's ETag
                etag = self.head(key).etag
            with ThreadPoolExecutor(min(threads, len(ranges))) as pool:
                got = sum(pool.map(lambda r: self._read(key, r[0], r[1], write, etag), ranges))
        if got != size:  # the caller's size (from a manifest) is not the object's
            raise CorruptObject(f"GET {self.url(key)}: the object has {got} bytes, {size} were expected")
        return got

    def _read(
        self, key: str, start: int, end: int | None, sink, etag: str | None = None, chunk: int = CHUNK
    ) -> int:
        """Stream bytes ``[start, end)`` (``end`` None: to the end) into ``sink(offset, data)``; a body cut
        short is resumed from the byte reached; the bytes delivered."""
        pos = start
        state = {"etag": etag}

        def attempt() -> None:
            nonlocal pos
            kwargs = {"Bucket": self.bucket, "Key": key}
            if pos > start or end is not None:
                if end is not None and pos >= end:
                    return
                kwargs["Range"] = f"bytes={pos}-{'' if end is None else end - 1}"
            if state["etag"]:
                kwargs["IfMatch"] = state["etag"]
            try:
                r = self.client.get_object(**kwargs)
            except Exception as err:
                if http_status(err) == 416 and (end is None or pos == start):
                    return  # a range at or past the end: nothing (left) to read
                raise
            if state["etag"] is None:
                state["etag"] = r.get("ETag")
            for data in r["Body"].iter_chunks(chunk):
                sink(pos, data)
                pos += len(data)
                current.progress()

        for current in self.retry.attempts(f"GET {self.url(key)}"):
            try:
                with current:
                    attempt()
            except Exception as err:  # noqa: BLE001 -- mapped, never swallowed
                mapped = self._mapped(err, "GET", key)
                if isinstance(mapped, AlreadyExists):  # If-Match failed: replaced while we read
                    mapped = CorruptObject(
                        f"GET {self.url(key)}: the object was replaced while it was being read; read it again"
                    )
                raise mapped from err
        return pos - start

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""
        token = None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("LIST", prefix, lambda: self.client.list_objects_v2(**kwargs))
            for obj in page.get("Contents", []):
                yield ObjectInfo(
                    key=obj["Key"],
                    size=int(obj["Size"]),
                    etag=obj.get("ETag", ""),
                    last_modified=obj["LastModified"].timestamp() if obj.get("LastModified") else 0.0,
                )
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def list_prefixes(self, prefix: str) -> list[str]:
        """The "folders" right under ``prefix`` (which should end with "/"): keys up to the next "/"."""
        out, token = [], None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("LIST", prefix, lambda: self.client.list_objects_v2(**kwargs))
            out += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    # --- writes ---------------------------------------------------------------------------------------
    def put_bytes(
        self, key: str, data: bytes, *, create_only: bool = False, metadata: dict | None = None
    ) -> None:
        """Write a small object. ``create_only``: S3's ``If-None-Match: *`` -- AlreadyExists if the key
        exists (where the server honours the header; docs/object-storage.md lists which do)."""
        kwargs = {"Bucket": self.bucket, "Key": key, "Body": data, "Metadata": metadata or {}}
        if create_only:
            kwargs["IfNoneMatch"] = "*"
        tries = 0

        def put():
            nonlocal tries
            tries += 1
            return self.client.put_object(**kwargs)

        try:
            self._call("PUT", key, put)
        except AlreadyExists:
            # a retried create may meet its own first attempt, whose answer was lost: same bytes = ours
            if tries > 1 and self.get_bytes(key) == data:
                return
            raise AlreadyExists(
                f"PUT {self.url(key)}: the object already exists (create-only write)"
            ) from None

    def put_file(
        self,
        key: str,
        path: str | Path,
        *,
        part_size: int = PART_SIZE,
        threads: int = 4,
        metadata: dict | None = None,
    ) -> int:
        """Upload a local file; multipart (``threads`` parts at once) when larger than ``part_size``.
        The bytes uploaded. A failed multipart upload is aborted (its parts do not linger)."""
        path = Path(path)
        size = path.stat().st_size
        meta = metadata or {}
        if size <= part_size:
            data = path.read_bytes()
            self._call(
                "PUT",
                key,
                lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data, Metadata=meta),
            )
            return size
        part = max(part_size, MIN_PART, -(-size // MAX_PARTS))
        up = self._call(
            "PUT (start multipart)",
            key,
            lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=key, Metadata=meta),
        )
        upload_id = up["UploadId"]
        try:
            fd = os.open(path, os.O_RDONLY)
            try:

                def send(i: int) -> dict:
                    off = i * part
                    data = os.pread(fd, min(part, size - off), off)
                    r = self._call(
                        f"PUT (part {i + 1})",
                        key,
                        lambda: self.client.upload_part(
                            Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=i + 1, Body=data
                        ),
                    )
                    return {"PartNumber": i + 1, "ETag": r["ETag"]}

                count = -(-size // part)
                with ThreadPoolExecutor(max(1, min(threads, count))) as pool:
                    parts = list(pool.map(send, range(count)))
            finally:
                os.close(fd)
            self._complete(key, upload_id, parts, size)
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception as err:  # noqa: BLE001 -- the first error is the one to report
                log.warning(
                    "could not abort the multipart upload of %s: %s", self.url(key), type(err).__name__
                )
            raise
        return size

    def _complete(self, key: str, upload_id: str, parts: list[dict], size: int) -> None:
        tries = 0

        def complete():
            nonlocal tries
            tries += 1
            return self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )

        try:
            self._call("PUT (complete multipart)", key, complete)
        except RemoteError as err:
            # a retried completion whose first answer was lost finds the upload gone (NoSuchUpload)
            if tries > 1 and "NoSuchUpload" in str(err) and self.head(key).size == size:
                return
            raise

    def delete(self, key: str) -> None:
        """Delete ``key`` (no error if it is already gone)."""
        self._call("DELETE", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=key))

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete ``keys`` (1000 per request); the number asked to delete."""
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            r = self._call(
                "DELETE",
                keys[i],
                lambda: self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )
            errors = [e for e in r.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                raise RemoteError(
                    f"DELETE {self.url(first.get('Key', ''))} failed: {first.get('Code')} "
                    f"({len(errors)} of {len(batch)} keys not deleted)"
                )
        return len(keys)


def sha256_file(path: str | Path) -> str:
    from pipeline.data.integrity import file_sha256

    return file_sha256(Path(path), bufsize=4 * MIB)
