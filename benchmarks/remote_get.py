"""Raw parallel GET (and multipart PUT) bandwidth from an S3-compatible endpoint.

    AWS_ENDPOINT_URL=http://127.0.0.1:4568 AWS_ACCESS_KEY_ID=S3RVER AWS_SECRET_ACCESS_KEY=S3RVER \\
        python benchmarks/remote_get.py s3://bench/get --objects 8 --size-mb 64 --threads 8 --upload

The figure the streaming reader is compared with: how fast plain GETs move bytes from this endpoint to
this machine, with nothing else in the way (no checksum, no file, no decode). Each object is read whole
(one GET per object, ``--threads`` at a time) and in ranged GETs of ``--part-mb`` (all parts of all objects,
``--threads`` at a time); each mode is repeated ``--repeat`` times and the best and median printed, with the
client process's CPU seconds per GB (a figure the server's speed does not change).

``--upload`` first writes the objects (random bytes, multipart in parts of ``--part-mb``, ``--threads``
parts in parallel) and prints that PUT bandwidth; without it the objects of an earlier ``--upload`` are
read. ``--client`` picks the library: ``project`` (default: pipeline.data.remote's ObjectStore, the path
training takes), or ``boto3``, ``obstore``, ``s3fs`` called directly (the comparison in
docs/object-storage.md; each needs its package). Endpoint and credentials come from the environment
(``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, the AWS credential chain), never from arguments.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's pipeline package

from pipeline.data.remote.urls import parse_location  # noqa: E402

MIB = 2**20


def endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


class ProjectClient:
    """pipeline.data.remote.store.ObjectStore: what export and training use."""

    def __init__(self, bucket: str, threads: int) -> None:
        from pipeline.data.remote.store import ObjectStore

        self.store = ObjectStore(bucket, max_connections=threads)
        self.name = f"project ({self.store.library})"

    def get(self, key: str) -> int:
        return len(self.store.get_bytes(key))

    def get_range(self, key: str, start: int, end: int) -> int:
        return len(self.store.get_range(key, start, end))

    def put_file(self, key: str, path: Path, part: int, threads: int) -> None:
        from pipeline.data.remote.store import sha256_file

        self.store.put_file(
            key, path, part_size=part, threads=threads, metadata={"sha256": sha256_file(path)}
        )


class Boto3Client:
    def __init__(self, bucket: str, threads: int) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        cfg = Config(max_pool_connections=threads + 2, s3={"addressing_style": "path"} if endpoint() else {})
        self.s3 = boto3.session.Session().client("s3", config=cfg)
        self.name = f"boto3 {boto3.__version__}"

    def get(self, key: str) -> int:
        return len(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def get_range(self, key: str, start: int, end: int) -> int:
        r = self.s3.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}")
        return len(r["Body"].read())

    def put_file(self, key: str, path: Path, part: int, threads: int) -> None:
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=threads)
        self.s3.upload_file(str(path), self.bucket, key, Config=cfg)


class ObstoreClient:
    def __init__(self, bucket: str, threads: int) -> None:
        import obstore
        from obstore.store import S3Store

        self.obs = obstore
        from datetime import timedelta

        retry = None
        if os.environ.get("BENCH_OBSTORE_RETRIES"):  # remote_client_faults.py --tuned
            retry = {
                "max_retries": int(os.environ["BENCH_OBSTORE_RETRIES"]),
                "retry_timeout": timedelta(seconds=60),
                "backoff": {"init_backoff": timedelta(seconds=0.1), "max_backoff": timedelta(seconds=2)},
            }
        self.store = S3Store(
            bucket,
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
            retry_config=retry,
        )
        self.name = f"obstore {obstore.__version__}"

    def get(self, key: str) -> int:
        return len(self.obs.get(self.store, key).bytes())

    def get_range(self, key: str, start: int, end: int) -> int:
        return len(self.obs.get_range(self.store, key, start=start, end=end))

    def put_file(self, key: str, path: Path, part: int, threads: int) -> None:
        self.obs.put(self.store, key, path, chunk_size=part, max_concurrency=threads)


class S3fsClient:
    def __init__(self, bucket: str, threads: int) -> None:
        import s3fs

        self.bucket = bucket
        self.fs = s3fs.S3FileSystem(
            endpoint_url=endpoint(),
            max_concurrency=threads,
            config_kwargs={"max_pool_connections": threads + 2},
        )
        self.name = f"s3fs {s3fs.__version__}"

    def get(self, key: str) -> int:
        return len(self.fs.cat_file(f"{self.bucket}/{key}"))

    def get_range(self, key: str, start: int, end: int) -> int:
        return len(self.fs.cat_file(f"{self.bucket}/{key}", start=start, end=end))

    def put_file(self, key: str, path: Path, part: int, threads: int) -> None:
        self.fs.put_file(str(path), f"{self.bucket}/{key}", chunksize=part, max_concurrency=threads)


CLIENTS = {"project": ProjectClient, "boto3": Boto3Client, "obstore": ObstoreClient, "s3fs": S3fsClient}


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def timed(fn, jobs: list, threads: int) -> tuple[float, float, int]:
    """(wall seconds, client CPU seconds, bytes) of ``fn(*job)`` for every job, ``threads`` at once."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        got = sum(pool.map(lambda job: fn(*job), jobs))
    return time.perf_counter() - t0, cpu_seconds() - c0, got


def cache_run(
    store, keys: list[str], size: int, part: int, threads: int, streams: int
) -> tuple[float, float, int]:
    """Every object through a cold ObjectCache (the path training takes): ``threads`` objects at once,
    each in ``streams`` ranged GETs of ``part`` bytes (1: one GET, hashed as it arrives; more: the file is
    hashed after), verified against its sha256, fdatasync'ed, renamed in."""
    import hashlib

    from pipeline.data.remote.cache import ObjectCache

    digests = {k: store.head(k).metadata.get("sha256") for k in keys}
    if not all(digests.values()):  # objects written by another client: digest them once, untimed
        digests = {k: hashlib.sha256(store.get_bytes(k)).hexdigest() for k in keys}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_CACHE_DIR")) as tmp:
        c0, t0 = cpu_seconds(), time.perf_counter()
        with ObjectCache(
            store,
            tmp,
            limit_bytes=len(keys) * size,
            threads=threads,
            part_size=part,
            download_threads=streams,
        ) as cache:
            cache.prefetch((k, size, digests[k]) for k in keys)
            for k in keys:
                cache.fetch(k, size, digests[k])
                cache.release(k)
        return time.perf_counter() - t0, cpu_seconds() - c0, len(keys) * size


def report(label: str, runs: list[tuple[float, float, int]]) -> None:
    rates = [b / MIB / w for w, _, b in runs]
    cpu_per_gb = statistics.median(c / (b / 2**30) for _, c, b in runs)
    print(
        f"  {label:<34} best {max(rates):8.1f} MiB/s   median {statistics.median(rates):8.1f} MiB/s   "
        f"client CPU {cpu_per_gb:5.2f} s/GiB   ({len(runs)} runs, {runs[0][2] / MIB:.0f} MiB each)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", help="s3://bucket/prefix holding (or to hold, with --upload) the bench objects")
    ap.add_argument("--objects", type=int, default=8)
    ap.add_argument("--size-mb", type=float, default=64, help="MiB per object")
    ap.add_argument("--threads", type=int, default=8, help="requests in flight")
    ap.add_argument("--part-mb", type=float, default=8, help="MiB per ranged GET and per multipart part")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache-streams", type=int, default=1, help="--modes cache: ranged GETs per object")
    ap.add_argument("--client", choices=sorted(CLIENTS), default="project")
    ap.add_argument("--upload", action="store_true", help="write the objects first (and time the PUTs)")
    ap.add_argument(
        "--modes",
        default="whole,ranged",
        help="comma-separated: whole, ranged, cache (project client: through a cold ObjectCache to files; "
        "BENCH_CACHE_DIR picks the disk)",
    )
    args = ap.parse_args(argv)

    loc = parse_location(args.url)
    if loc.scheme != "s3":
        ap.error(f"{args.url}: the bench reads from an object store (s3://bucket/prefix)")
    size, part = int(args.size_mb * MIB), int(args.part_mb * MIB)
    keys = [loc.key(f"bench-{size}-{i:03d}.bin") for i in range(args.objects)]
    client = CLIENTS[args.client](loc.bucket, args.threads)
    print(
        f"{client.name}: {args.objects} objects x {args.size_mb:g} MiB at {args.url} "
        f"(endpoint {endpoint() or 'AWS default'}), {args.threads} requests in flight, "
        f"parts {args.part_mb:g} "
        f"MiB, {os.cpu_count()} CPUs"
    )
    if args.upload:
        runs = []
        with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
            src = Path(tmp, "object.bin")
            for i, key in enumerate(keys):
                src.write_bytes(os.urandom(size))  # fresh bytes per object: no dedupe anywhere
                runs.append(
                    timed(lambda k: (client.put_file(k, src, part, args.threads), size)[1], [(key,)], 1)
                )
        report(
            "PUT multipart (one object at a time)",
            [(sum(r[0] for r in runs), sum(r[1] for r in runs), sum(r[2] for r in runs))],
        )
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    ranges = [(k, a, min(a + part, size)) for k in keys for a in range(0, size, part)]
    for mode in modes:
        if mode == "whole":
            runs = [timed(client.get, [(k,) for k in keys], args.threads) for _ in range(args.repeat)]
            report("GET whole objects", runs)
        elif mode == "ranged":
            runs = [timed(client.get_range, ranges, args.threads) for _ in range(args.repeat)]
            report(f"GET ranges of {args.part_mb:g} MiB", runs)
        elif mode == "cache":
            if args.client != "project":
                ap.error("--modes cache measures the project's ObjectCache: use --client project")
            runs = [
                cache_run(client.store, keys, size, part, args.threads, args.cache_streams)
                for _ in range(args.repeat)
            ]
            report(f"ObjectCache.fetch, {args.cache_streams} GET/object", runs)
        else:
            ap.error(f"--modes: unknown mode {mode!r}; valid: whole, ranged, cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
