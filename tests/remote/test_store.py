"""ObjectStore and retries against a real S3 server (moto, on 127.0.0.1) through a fault proxy."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from pipeline.data.remote.errors import (
    AccessDenied,
    AlreadyExists,
    BucketNotFound,
    LocationError,
    ObjectNotFound,
    RemoteUnavailable,
)
from pipeline.data.remote.retry import RetryPolicy, is_transient
from pipeline.data.remote.store import MIB, ObjectStore
from tests.remote.conftest import aws_env


def _blob(n: int, seed: int = 0) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32) + b"x" * (n % 32)


def test_multipart_put_and_parallel_ranged_get_match_the_serial_path(s3, tmp_path):
    data = os.urandom(11 * MIB + 123)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    s3.store.put_file("a/big.bin", src, part_size=5 * MIB, threads=3, metadata={"sha256": "abc"})
    info = s3.store.head("a/big.bin")
    assert info.etag.endswith('-3"')  # a multipart object's ETag: <digest>-<parts>
    assert info.size == len(data) and info.metadata == {"sha256": "abc"}
    serial, parallel = tmp_path / "serial.bin", tmp_path / "parallel.bin"
    s3.store.get_to_file("a/big.bin", serial, threads=1)
    s3.store.get_to_file("a/big.bin", parallel, part_size=2 * MIB, threads=4)
    assert serial.read_bytes() == parallel.read_bytes() == data
    assert s3.store.get_range("a/big.bin", 5 * MIB - 7, 5 * MIB + 9) == data[5 * MIB - 7 : 5 * MIB + 9]
    assert s3.store.get_bytes("a/big.bin") == data
    assert not list(tmp_path.glob(".*.part"))  # atomic: no temp file left
    s3.store.put_bytes("a/small", b"hi")
    assert [o.key for o in s3.store.list("a/")] == ["a/big.bin", "a/small"]
    assert s3.store.list_prefixes("") == ["a/"]
    s3.store.delete_many(["a/big.bin", "a/small"])
    assert list(s3.store.list("a/")) == []


def test_create_only_put_refuses_an_existing_key(s3):
    s3.store.put_bytes("m.json", b"first", create_only=True)
    with pytest.raises(AlreadyExists, match=f"s3://{s3.bucket}/m.json"):
        s3.store.put_bytes("m.json", b"second", create_only=True)
    assert s3.store.get_bytes("m.json") == b"first"


def test_missing_bucket_and_object_are_named(s3):
    store = ObjectStore("no-such-bucket-here")
    for call in (store.check_bucket, lambda: store.get_bytes("x/y"), lambda: store.head("x/y")):
        with pytest.raises(BucketNotFound, match="'no-such-bucket-here'.*AWS_ENDPOINT_URL"):
            call()
    with pytest.raises(ObjectNotFound, match=f"s3://{s3.bucket}/nope does not exist"):
        s3.store.get_bytes("nope")
    with pytest.raises(ObjectNotFound, match=f"s3://{s3.bucket}/nope does not exist"):
        s3.store.head("nope")
    with pytest.raises(LocationError, match="'Bad_Name'"):
        ObjectStore("Bad_Name")


def test_denied_credentials_are_named_without_printing_a_secret(moto_with_iam, monkeypatch, tmp_path):
    endpoint, bucket, key_id, secret = moto_with_iam
    aws_env(monkeypatch, tmp_path, endpoint, key_id, secret)  # a real user, without any policy
    with pytest.raises(AccessDenied, match=f"s3://{bucket}/k.*credential chain") as err:
        ObjectStore(bucket).get_bytes("k")
    aws_env(monkeypatch, tmp_path, endpoint, key_id, "wrong-secret-value")
    with pytest.raises(AccessDenied, match=f"s3://{bucket}.*credential chain") as err2:
        ObjectStore(bucket).check_bucket()
    for e in (err, err2):
        assert secret not in str(e.value) and "wrong-secret-value" not in str(e.value)
        assert key_id not in str(e.value)


def test_missing_credentials_are_named(s3, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(AccessDenied, match="no usable AWS credentials"):
        ObjectStore(s3.bucket).get_bytes("k")


def test_a_body_cut_mid_get_is_resumed_after_an_outage(s3):
    data = _blob(16 * MIB)
    s3.raw.put_object(Bucket=s3.bucket, Key="o", Body=data)
    s3.proxy.outage(0.8, after_bytes=10 * MIB)  # the server vanishes mid-body for 0.8 s
    assert s3.store.get_bytes("o") == data
    assert s3.proxy.connections >= 2 and not s3.proxy.in_outage
    after = s3.proxy.downstream_bytes - s3.proxy.downstream_at_cut
    assert after < len(data)  # resumed from the byte reached (a restart would send all 16 MiB again)


def test_throttling_is_retried_and_a_missing_key_is_not(s3):
    s3.raw.put_object(Bucket=s3.bucket, Key="o", Body=b"data")
    sleeps: list[float] = []
    store = ObjectStore(s3.bucket, retry=RetryPolicy(give_up_after_s=10, sleep=sleeps.append))
    s3.proxy.http_errors(3, 503, "SlowDown")
    assert store.get_bytes("o") == b"data" and len(sleeps) == 3
    s3.proxy.http_errors(1, 500, "InternalError")
    assert store.get_bytes("o") == b"data" and len(sleeps) == 4
    with pytest.raises(ObjectNotFound):
        store.get_bytes("missing")
    assert len(sleeps) == 4  # raised at once


def test_an_outage_longer_than_the_budget_fails_naming_the_endpoint(s3):
    store = ObjectStore(s3.bucket, retry=RetryPolicy(give_up_after_s=0.5, cap_s=0.2))
    s3.proxy.outage(5)
    with pytest.raises(RemoteUnavailable, match=f"s3://{s3.bucket}/o.*{s3.proxy.endpoint}.*AWS_ENDPOINT_URL"):
        store.get_bytes("o")


@pytest.mark.slow
def test_a_stalled_link_times_out_and_is_retried(s3):
    data = _blob(3 * MIB, 1)
    s3.raw.put_object(Bucket=s3.bucket, Key="o", Body=data)
    store = ObjectStore(s3.bucket, retry=RetryPolicy(give_up_after_s=10, cap_s=0.2), read_timeout=0.5)
    s3.proxy.stall()
    threading.Timer(1.2, s3.proxy.resume).start()
    assert store.get_bytes("o") == data


def test_transient_classification():
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert not is_transient(ValueError("x")) and not is_transient(FileNotFoundError())

    class Answer(Exception):
        def __init__(self, status, code):
            self.response = {"ResponseMetadata": {"HTTPStatusCode": status}, "Error": {"Code": code}}

    assert is_transient(Answer(503, "SlowDown")) and is_transient(Answer(400, "RequestTimeout"))
    assert is_transient(Answer(429, "TooManyRequests")) and is_transient(Answer(500, "InternalError"))
    assert not is_transient(Answer(404, "NoSuchKey")) and not is_transient(Answer(403, "AccessDenied"))
    with pytest.raises(ValueError, match="give_up_after_s"):
        RetryPolicy(give_up_after_s=-1)
