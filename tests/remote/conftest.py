"""A real S3-compatible server for the tests: moto's server mode on 127.0.0.1, behind a fault proxy.

    def test_x(s3):             # a fixture of every test under tests/remote/
        s3.store                # ObjectStore on a fresh bucket, through s3.proxy (env: AWS_ENDPOINT_URL)
        s3.proxy.outage(2)      # tests/remote/tcp_proxy.py
        s3.raw.put_object(...)  # boto3 straight to the server (behind the project's back)

Why moto: it is a real HTTP server speaking the S3 REST API (signatures, multipart uploads, ranged GETs,
``If-None-Match``/``If-Match``, IAM enforcement when asked), installs from PyPI with the dev extras and
starts in well under a second in-process (``ThreadedMotoServer``), so every test gets its own bucket on
one server per session. Its objects live in memory and a ranged GET copies the whole object, so it is
right for correctness and faults, not for throughput (benchmarks/remote_get.py uses a filesystem-backed
server; docs/object-storage.md). The environment each test sees holds only the standard variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) with the
developer's ``~/.aws`` files pointed away, so what passes here is what a user's environment drives.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.remote.tcp_proxy import FaultProxy

KEY, SECRET = "testing-key-id", "testing-secret-never-printed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.02)


@pytest.fixture(scope="session")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    wait_port(port)
    yield f"http://127.0.0.1:{port}"
    server.stop()


def aws_env(monkeypatch, tmp_path: Path, endpoint: str, key: str = KEY, secret: str = SECRET) -> None:
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@dataclass
class S3:
    bucket: str
    server: str  # the server's endpoint (the proxy forwards to it)
    proxy: FaultProxy
    raw: object  # boto3 client straight to the server
    store: object  # pipeline ObjectStore through the proxy

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


def raw_client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        config=Config(s3={"addressing_style": "path"}),
    )


@pytest.fixture
def s3(moto_endpoint, monkeypatch, tmp_path):
    """A fresh bucket on the session's moto server; the environment points at a fault proxy before it."""
    from pipeline.data.remote.retry import RetryPolicy
    from pipeline.data.remote.store import ObjectStore

    port = int(moto_endpoint.rsplit(":", 1)[1])
    with FaultProxy(("127.0.0.1", port)) as proxy:
        aws_env(monkeypatch, tmp_path, proxy.endpoint)
        raw = raw_client(moto_endpoint)
        bucket = f"t-{uuid.uuid4().hex[:12]}"
        raw.create_bucket(Bucket=bucket)
        store = ObjectStore(bucket, retry=RetryPolicy(give_up_after_s=20, cap_s=1.0), read_timeout=5)
        yield S3(bucket, moto_endpoint, proxy, raw, store)


@pytest.fixture
def moto_with_iam(tmp_path):
    """A moto server (own process) that enforces IAM after its first 3 requests: a bucket, a user without
    any policy and that user's access key. Yields (endpoint, bucket, user key id, user secret)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        import boto3

        endpoint = f"http://127.0.0.1:{port}"
        kw = dict(
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=KEY,
            aws_secret_access_key=SECRET,
        )
        boto3.client("s3", **kw).create_bucket(Bucket="guarded")
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        yield endpoint, "guarded", key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
