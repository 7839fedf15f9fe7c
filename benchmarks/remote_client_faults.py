"""How S3 client libraries behave when the link fails: what each does, with its default settings.

    AWS_ENDPOINT_URL=http://127.0.0.1:4568 AWS_ACCESS_KEY_ID=S3RVER AWS_SECRET_ACCESS_KEY=S3RVER \\
        python benchmarks/remote_client_faults.py s3://bench/faults --clients boto3,obstore,s3fs,project

Each client reads (and writes) a 64 MiB object through a fault proxy (tests/remote/tcp_proxy.py: the one the
tests use) in front of the endpoint, in these situations:

- ``refused 5 s``: the server refuses connections for 5 s when the GET starts;
- ``drop mid-GET``: every connection is reset after 8 MiB of the body, then refused for 5 s;
- ``503 SlowDown x3``: the first three requests are answered 503 SlowDown;
- ``drop mid-PUT``: a multipart upload's connections are reset after 24 MiB, then refused for 3 s;
- ``stall 75 s`` (``--stall``): nothing moves for 75 s (a black hole), then the link comes back.

It prints, per client and situation, whether the call returned the right bytes, how long it took, and
the error it raised otherwise. The figures in docs/object-storage.md came from this script.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.remote_get import CLIENTS, endpoint  # noqa: E402
from pipeline.data.remote.urls import parse_location  # noqa: E402
from tests.remote.tcp_proxy import FaultProxy  # noqa: E402

MIB = 2**20


def run(label: str, fn, setup, timeout: float, proxy: FaultProxy) -> None:
    box: dict = {}

    def go():
        t0 = time.perf_counter()
        try:
            box["ok"] = fn()
        except BaseException as err:  # noqa: BLE001 -- what the client raised is the finding
            first = (str(err).splitlines() or [""])[0][:160]
            box["err"] = f"{type(err).__module__}.{type(err).__name__}: {first}"
        box["s"] = time.perf_counter() - t0

    proxy.wait_healthy()
    proxy.cancel_faults()
    setup()
    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        print(f"    {label:<18} HUNG (no answer after {timeout:.0f} s)")
    elif "err" in box:
        print(f"    {label:<18} FAILED after {box['s']:6.1f} s: {box['err']}")
    else:
        print(f"    {label:<18} {'ok' if box['ok'] else 'WRONG BYTES'} in {box['s']:6.1f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("--clients", default="boto3,obstore,s3fs")
    ap.add_argument("--stall", action="store_true", help="also the 75 s black hole (slow)")
    ap.add_argument("--stall-only", action="store_true", help="only the 75 s black hole")
    ap.add_argument(
        "--tuned",
        action="store_true",
        help="retry budgets raised: boto3 standard mode, 10 attempts; obstore 30 retries, backoff <= 2 s; "
        "s3fs 10 retries",
    )
    ap.add_argument("--timeout", type=float, default=150, help="give up waiting for a call after this")
    args = ap.parse_args(argv)
    loc = parse_location(args.url)
    real = endpoint()
    if not real:
        ap.error("set AWS_ENDPOINT_URL to the server to put the proxy in front of")
    if args.tuned:
        os.environ.update(AWS_RETRY_MODE="standard", AWS_MAX_ATTEMPTS="10", BENCH_OBSTORE_RETRIES="30")
    host, port = real.split("://", 1)[1].split(":")
    data = os.urandom(64 * MIB)
    digest = hashlib.sha256(data).hexdigest()
    key = loc.key("probe-64.bin")
    with tempfile.TemporaryDirectory() as tmp, FaultProxy((host, int(port))) as proxy:
        src = Path(tmp, "src.bin")
        src.write_bytes(data)
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint  # every client is built after this
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        for name in args.clients.split(","):
            client = CLIENTS[name](loc.bucket, 8)
            if args.tuned and name == "s3fs":
                client.fs.retries = 10
            print(
                f"{client.name} ({'raised' if args.tuned else 'default'} retry settings), "
                f"through {proxy.endpoint} -> {real}"
            )
            client.put_file(key, src, 8 * MIB, 4)

            def get_ok(client=client):
                got = _get(client, key)
                return hashlib.sha256(got).hexdigest() == digest

            def put_ok(client=client):
                client.put_file(key + ".up", src, 8 * MIB, 4)
                return hashlib.sha256(_get(client, key + ".up")).hexdigest() == digest

            if not args.stall_only:
                run("refused 5 s", get_ok, lambda: proxy.outage(5), args.timeout, proxy)
                run("drop mid-GET", get_ok, lambda: proxy.outage(5, after_bytes=8 * MIB), args.timeout, proxy)
                run("503 SlowDown x3", get_ok, lambda: proxy.http_errors(3), args.timeout, proxy)
                run(
                    "drop mid-PUT", put_ok, lambda: proxy.outage(3, after_bytes=24 * MIB), args.timeout, proxy
                )
            if args.stall or args.stall_only:
                timer = threading.Timer(75, proxy.resume)
                run("stall 75 s", get_ok, lambda: (proxy.stall(), timer.start()), args.timeout, proxy)
                timer.cancel()
                proxy.resume()
    return 0


def _get(client, key: str) -> bytes:
    if hasattr(client, "s3"):
        return client.s3.get_object(Bucket=client.bucket, Key=key)["Body"].read()
    if hasattr(client, "obs"):
        return bytes(client.obs.get(client.store, key).bytes())
    if hasattr(client, "fs"):
        return client.fs.cat_file(f"{client.bucket}/{key}")
    return client.store.get_bytes(key)


if __name__ == "__main__":
    sys.exit(main())
