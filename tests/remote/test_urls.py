"""Data locations: local paths and s3:// parsed; every other scheme, and mistyped URLs, refused by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.data.remote.errors import LocationError
from pipeline.data.remote.urls import parse_location


@pytest.mark.parametrize(
    "value, scheme, bucket, prefix, path",
    [
        ("s3://team-data/exports/v1", "s3", "team-data", "exports/v1", None),
        ("s3://team-data/exports/", "s3", "team-data", "exports", None),
        ("s3://team.data-2", "s3", "team.data-2", "", None),
        ("S3://abc/x", "s3", "abc", "x", None),
        ("outputs/data", "local", "", "", Path("outputs/data")),
        ("/abs/data", "local", "", "", Path("/abs/data")),
        ("file:///abs/my%20data", "local", "", "", Path("/abs/my data")),
        ("file://localhost/abs", "local", "", "", Path("/abs")),
        (Path("rel/p"), "local", "", "", Path("rel/p")),
    ],
)
def test_supported_locations(value, scheme, bucket, prefix, path):
    loc = parse_location(value)
    assert (loc.scheme, loc.bucket, loc.prefix, loc.path) == (scheme, bucket, prefix, path)


def test_keys_and_urls_join_under_the_prefix():
    loc = parse_location("s3://team-data/exports")
    assert loc.key("x-1", "manifest.json") == "exports/x-1/manifest.json"
    assert loc.url("x-1") == "s3://team-data/exports/x-1"
    assert loc.child("x-1").prefix == "exports/x-1"
    assert parse_location("s3://team-data").key("a") == "a"


@pytest.mark.parametrize(
    "value, named",
    [
        ("gs://bucket/x", "gs://"),
        ("gcs://bucket/x", "gcs://"),
        ("http://host:9000/bucket", "http://"),
        ("https://s3.amazonaws.com/bucket", "https://"),
        ("hdfs://namenode/data", "hdfs://"),
        ("az://container/x", "az://"),
        ("abfss://c@acct.dfs.core.windows.net/x", "abfss://"),
        ("s3a://bucket/x", "s3a://"),
        ("s3n://bucket/x", "s3n://"),
        ("s3:/bucket/x", "s3://bucket/prefix"),
        ("s3:bucket/x", "s3://bucket/prefix"),
        ("s3:///bucket", "s3://bucket/prefix"),
        ("s3//bucket/x", "':' missing"),
        ("gs//bucket/x", "':' missing"),
        ("file:relative/x", "file:///absolute/path"),
        ("file://otherhost/x", "'otherhost'"),
        ("s3://bucket/x?versionId=3", "query strings"),
        ("", "empty data location"),
    ],
)
def test_unsupported_or_mistyped_locations_are_refused_by_name(value, named, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(LocationError) as err:
        parse_location(value)
    assert named in str(err.value)
    if value:
        assert "s3://bucket/prefix" in str(err.value) or "file:///" in str(err.value)
    assert os.listdir(cwd) == []  # never taken as (or made into) a local folder


@pytest.mark.parametrize(
    "bucket, why",
    [
        ("My-Bucket", "'B', 'M'"),
        ("my_bucket", "'_'"),
        ("ab", "2 characters"),
        ("a" * 64, "64 characters"),
        ("-bucket", "begin and end"),
        ("bucket.", "begin and end"),
        ("my..bucket", "adjacent dots"),
        ("192.168.1.10", "IP address"),
        ("xn--bucket", "reserves"),
    ],
)
def test_bucket_names_are_checked_before_any_request(bucket, why):
    with pytest.raises(LocationError, match="bucket name") as err:
        parse_location(f"s3://{bucket}/x")
    assert why in str(err.value) and "3-63 characters" in str(err.value)


@pytest.mark.parametrize(
    "value", ["s3://bucket//x", "s3://bucket/a/../b", "s3://bucket/./a", "s3://bucket/a\x01"]
)
def test_prefixes_are_plain_key_paths(value):
    with pytest.raises(LocationError, match="key prefix"):
        parse_location(value)
