"""Where data lives: a local folder or an S3 bucket prefix, parsed once and refused early when unsupported.

    from pipeline.data.remote.urls import parse_location
    loc = parse_location("s3://team-data/exports")    # Location("s3", bucket="team-data", prefix="exports")
    loc.key("lfw-shards-ab12/manifest.json")           # "exports/lfw-shards-ab12/manifest.json"
    loc.url("lfw-shards-ab12")                         # "s3://team-data/exports/lfw-shards-ab12"
    parse_location("outputs/data").path                # Path("outputs/data") (also file:///abs/path)
    parse_location("gs://bucket/x")                    # LocationError naming gs:// and what is supported

Supported: a local path, ``file:///absolute/path`` and ``s3://bucket[/prefix]`` (any S3-compatible server
through ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``). Anything that looks like a URL of another scheme
(``gs://``, ``http(s)://``, ``hdfs://``, ``az://``, ``s3a://``...), or a mistyped one (``s3:/x``,
``s3//x``), is refused by name -- it is never taken as the name of a local folder, where it would
silently create ``./gs:/bucket`` and export there. Bucket names follow S3's rules (checked here, so a bad
name fails before any request); prefixes are plain relative key paths (no empty, ``.`` or ``..``
component, no query or fragment).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from pipeline.data.remote.errors import LocationError

SUPPORTED = (
    "a local path, file:///absolute/path or s3://bucket/prefix (S3-compatible servers via AWS_ENDPOINT_URL)"
)

# ``name:`` at the start: a URL scheme (RFC 3986), at least 2 characters so a one-letter drive is not one
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")
# ``s3//bucket``: a scheme whose colon was lost -- a path no one means to create
_LOST_COLON = re.compile(r"^(s3|s3a|s3n|gs|gcs|http|https|hdfs|az|abfs|abfss|file|r2|oss|minio)//", re.I)
_HINTS = {
    "s3a": "s3a:// and s3n:// are Hadoop's names for S3: write s3://",
    "s3n": "s3a:// and s3n:// are Hadoop's names for S3: write s3://",
    "gs": "Google Cloud Storage serves the S3 API: use s3://bucket with "
    "AWS_ENDPOINT_URL=https://storage.googleapis.com and HMAC keys",
    "gcs": "Google Cloud Storage serves the S3 API: use s3://bucket with "
    "AWS_ENDPOINT_URL=https://storage.googleapis.com and HMAC keys",
    "http": "for an S3-compatible server (MinIO, Ceph, R2) write s3://bucket/prefix and put the server's "
    "address in AWS_ENDPOINT_URL",
    "https": "for an S3-compatible server (MinIO, Ceph, R2) write s3://bucket/prefix and put the server's "
    "address in AWS_ENDPOINT_URL",
}
_BUCKET_RULE = (
    "S3 bucket names are 3-63 characters of lowercase letters, digits, dots and hyphens, beginning and "
    "ending with a letter or digit"
)


@dataclass(frozen=True)
class Location:
    """A parsed data location: ``scheme`` "local" (``path``) or "s3" (``bucket`` + ``prefix``)."""

    scheme: str
    path: Path | None = None
    bucket: str = ""
    prefix: str = ""  # "" or "a/b": no leading or trailing slash

    @property
    def is_remote(self) -> bool:
        return self.scheme != "local"

    def key(self, *parts: str) -> str:
        """The object key of ``parts`` (relative key paths) under this location's prefix."""
        tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
        return "/".join(x for x in (self.prefix, tail) if x)

    def url(self, *parts: str) -> str:
        if not self.is_remote:
            return str(self.path.joinpath(*parts)) if parts else str(self.path)
        key = self.key(*parts)
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def child(self, *parts: str) -> Location:
        if not self.is_remote:
            return Location("local", path=self.path.joinpath(*parts))
        return Location("s3", bucket=self.bucket, prefix=_check_prefix(self.key(*parts), self.url(*parts)))

    def __str__(self) -> str:
        return self.url()


def check_bucket(bucket: str, url: str) -> str:
    """``bucket`` if it is a valid S3 bucket name; else LocationError naming it and the rule."""

    def bad(why: str) -> LocationError:
        return LocationError(f"{url}: bucket name {bucket!r} is not valid ({why}); {_BUCKET_RULE}")

    if not bucket:
        raise LocationError(f"{url}: no bucket name; write s3://bucket/prefix")
    if re.search(r"[^a-z0-9.\-]", bucket):
        found = sorted(set(re.findall(r"[^a-z0-9.\-]", bucket)))
        raise bad(f"it contains {', '.join(repr(c) for c in found)}")
    if not 3 <= len(bucket) <= 63:
        raise bad(f"it has {len(bucket)} characters")
    if not (bucket[0].isalnum() and bucket[-1].isalnum()):
        raise bad("it must begin and end with a letter or digit")
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        raise bad("adjacent dots, or a dot beside a hyphen")
    try:
        ipaddress.IPv4Address(bucket)
    except ValueError:
        pass
    else:
        raise bad("it is formatted as an IP address")
    if bucket.startswith(("xn--", "sthree-")) or bucket.endswith(("-s3alias", "--ol-s3")):
        raise bad("a prefix or suffix S3 reserves")
    return bucket


def _check_prefix(prefix: str, url: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in prefix):
        raise LocationError(f"{url}: the key prefix contains a control character")
    parts = prefix.split("/") if prefix else []
    if any(p in ("", ".", "..") for p in parts):
        raise LocationError(
            f"{url}: the key prefix {prefix!r} has an empty, '.' or '..' component; write "
            "s3://bucket/plain/key/prefix"
        )
    if len(prefix.encode()) > 700:  # keys are at most 1024 bytes; leave room for export and file names
        raise LocationError(f"{url}: the key prefix is {len(prefix.encode())} bytes; at most 700 are allowed")
    return prefix


def parse_location(value: str | os.PathLike) -> Location:
    """A Location for ``value``; LocationError (naming it and what is supported) for anything else."""
    if isinstance(value, os.PathLike):
        return Location("local", path=Path(value))
    if not isinstance(value, str):
        raise LocationError(f"{value!r} is not a data location; expected {SUPPORTED}")
    text = value.strip()
    if not text:
        raise LocationError(f"empty data location; expected {SUPPORTED}")
    if _LOST_COLON.match(text):
        scheme = text.split("/", 1)[0]
        raise LocationError(
            f"{value!r} looks like a {scheme}:// URL with its ':' missing; it is not taken as a local "
            "folder. "
            f"Supported: {SUPPORTED}"
        )
    m = _SCHEME.match(text)
    if not m:
        return Location("local", path=Path(text).expanduser())
    scheme = m.group(1).lower()
    rest = text[m.end() :]
    if scheme == "s3":
        return _parse_s3(value, rest)
    if scheme == "file":
        return _parse_file(value, rest)
    hint = _HINTS.get(scheme)
    raise LocationError(
        f"{value!r}: the {scheme}:// scheme is not supported; a data location is {SUPPORTED}"
        + (f" ({hint})" if hint else "")
    )


def _parse_s3(value: str, rest: str) -> Location:
    if not rest.startswith("//") or rest.startswith("///"):
        raise LocationError(
            f"{value!r} is not a valid S3 URL: write s3://bucket/prefix (two slashes, then the bucket name)"
        )
    if "?" in rest or "#" in rest:
        raise LocationError(
            f"{value!r}: query strings and fragments are not part of a data location; write s3://bucket/prefix"
        )
    bucket, _, prefix = rest[2:].partition("/")
    check_bucket(bucket, value)
    return Location("s3", bucket=bucket, prefix=_check_prefix(prefix.rstrip("/"), value))


def _parse_file(value: str, rest: str) -> Location:
    if not rest.startswith("//"):
        raise LocationError(f"{value!r} is not a valid file URL: write file:///absolute/path (three slashes)")
    host, slash, path = rest[2:].partition("/")
    if host not in ("", "localhost"):
        raise LocationError(
            f"{value!r} names the host {host!r}; file URLs here name a local path: file:///absolute/path"
        )
    if "?" in rest or "#" in rest:
        raise LocationError(f"{value!r}: query strings and fragments are not part of a data location")
    return Location("local", path=Path(unquote(slash + path)))
