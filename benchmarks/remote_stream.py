"""Training data streamed from a bucket: the project's reader against the endpoint's raw GET bandwidth and
LitData, on one local S3-compatible server, in one run.

    python -m benchmarks.remote_stream                 # 30,000 LFW-shaped samples, 16 MiB shards
    python -m benchmarks.remote_stream --samples 60000 --litdata /tmp/litvenv/bin/python

Starts ``s3rver`` (npm; filesystem-backed, so ranged GETs stream from disk: moto would copy whole objects in
memory) on 127.0.0.1 with a temporary folder, points ``AWS_ENDPOINT_URL`` at it, then:

1. exports LFW-shaped float32 samples to ``s3://bench/exports`` (``storage=shards``: built locally,
   published);
2. ``raw GET``: every shard object of the export read whole, 8 at a time, with the project's client (no
   checksum, no file): bytes/s, shown as samples/s of 11,656 bytes -- the ceiling a reader can approach;
3. ``project``: one epoch of the train split through the project's loader (0 workers), the shard cache
   cold (emptied first) and bounded below the data (``storage.cache_limit_mb``): steady samples/s;
4. ``litdata`` (with ``--litdata PYTHON``, a virtualenv where ``import litdata`` works): the same samples
   written by ``litdata.optimize`` to ``s3://bench/lit`` (16 MB chunks), then one epoch of its
   ``StreamingDataset`` through its ``StreamingDataLoader`` (batch 64, 0 workers), cache cold.

The server, the client and the reader share this machine's cores: say how many with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LITDATA = r"""
import json, os, sys, time, tempfile
import numpy as np
from litdata import StreamingDataset, StreamingDataLoader, optimize
import litdata.streaming.downloader as _dl
# LitData's obstore client refuses plain http (its client options lack allow_http); s3rver here is http
_dl._OBSTORE_CLIENT_OPTIONS = {**_dl._OBSTORE_CLIENT_OPTIONS, "allow_http": "true"}

n, out, endpoint = int(sys.argv[1]), sys.argv[2], os.environ["AWS_ENDPOINT_URL"]
opts = {"endpoint_url": endpoint}

def sample(i):
    rng = np.random.default_rng(i)
    return {"x": rng.standard_normal((62, 47), dtype=np.float32), "y": int(i % 5749)}

t0 = time.perf_counter()
optimize(fn=sample, inputs=list(range(n)), output_dir=out, chunk_bytes="16MB", num_workers=1,
         storage_options=opts)
write_s = time.perf_counter() - t0
cache = tempfile.mkdtemp(prefix="litdata-cache-")
ds = StreamingDataset(out, storage_options=opts, cache_dir=cache, shuffle=True, max_cache_size="200MB")
loader = StreamingDataLoader(ds, batch_size=64, num_workers=0)
it = iter(loader)
next(it)
t0, m = time.perf_counter(), 0
for batch in it:
    m += len(batch["y"])
print(json.dumps({"samples_per_s": m / (time.perf_counter() - t0), "optimize_s": write_s}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3rver(folder: Path, port: int) -> subprocess.Popen:
    cmd = ["npx", "--yes", "s3rver", "-d", str(folder), "-a", "127.0.0.1", "-p", str(port)]
    cmd += ["--configure-bucket", "bench", "--silent"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("s3rver did not start (npx s3rver: is the npm registry reachable?)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=30_000)
    ap.add_argument("--shard-mb", type=float, default=16.0)
    ap.add_argument("--cache-mb", type=float, default=128.0)
    ap.add_argument("--litdata", default=None, help="a python that can import litdata (its own venv)")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    port = free_port()
    server = start_s3rver(tmp / "s3rver", port)
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="S3RVER",
        AWS_SECRET_ACCESS_KEY="S3RVER",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    try:
        import torch
        from omegaconf import OmegaConf

        import pipeline.config
        from pipeline.config.schema import LoaderConfig
        from pipeline.data.partition import partition
        from pipeline.data.remote.exporting import export_to_bucket
        from pipeline.data.remote.store import ObjectStore
        from pipeline.data.sources.synthetic import SyntheticConfig
        from pipeline.data.storage.shards import ShardsConfig
        from pipeline.training.loading import build_loader

        pipeline.config.register()
        torch.set_num_threads(1)
        src = OmegaConf.structured(SyntheticConfig(num_samples=a.samples, shape=[62, 47], num_classes=5749))
        sto = OmegaConf.structured(ShardsConfig(shard_size_mb=a.shard_mb, cache_limit_mb=a.cache_mb))
        cache_dir = tmp / "cache"
        t0 = time.perf_counter()
        exp = export_to_bucket(src, sto, "s3://bench/exports", cache_dir)
        export_s = time.perf_counter() - t0
        sample_bytes = exp.spec.sample_bytes

        store = ObjectStore("bench")
        shards = [o for o in store.list(exp.url.split("bench/", 1)[1]) if "/shard-" in o.key]
        data_mb = sum(o.size for o in shards) / 1e6
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            got = sum(pool.map(lambda o: len(store.get_bytes(o.key)), shards))
        raw_mb_s = got / 1e6 / (time.perf_counter() - t0)

        shutil.rmtree(cache_dir / "shards", ignore_errors=True)  # cold
        exp = export_to_bucket(src, sto, "s3://bench/exports", cache_dir)
        split = partition(exp.labels, OmegaConf.create({"ratio": 0.8, "seed": 0, "stratify": False}))
        ds = exp.dataset(split.train, sto)
        cfg = OmegaConf.structured(LoaderConfig(batch_size=64, pin_memory="false"))
        loader = build_loader(ds, cfg, seed=0, train=True, device=torch.device("cpu"))
        it = iter(loader)
        next(it)
        t0, n = time.perf_counter(), 0
        for _x, y in it:
            n += len(y)
        stream_sps = n / (time.perf_counter() - t0)
        remote = exp.files.stats()

        lit = None
        if a.litdata:
            proc = subprocess.run(
                [a.litdata, "-c", LITDATA, str(a.samples), "s3://bench/lit"],
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if proc.returncode != 0:
                print("litdata failed:", proc.stderr[-2000:])
            else:
                lit = json.loads(proc.stdout.strip().splitlines()[-1])
        raw_sps = raw_mb_s * 1e6 / sample_bytes
        print(
            f"{a.samples:,} LFW-shaped float32 samples ({data_mb:,.0f} MB in {len(shards)} shards of "
            f"{a.shard_mb:g} MiB), s3rver on 127.0.0.1 sharing {os.cpu_count()} cores, load average "
            f"{os.getloadavg()[0]:.2f}; export + publish {export_s:.1f} s"
        )
        print(f"  raw GET, 8 threads      {raw_mb_s:8,.0f} MB/s = {raw_sps:10,.0f} samples/s")
        print(
            f"  project, cache cold     {stream_sps * sample_bytes / 1e6:8,.0f} MB/s = {stream_sps:10,.0f} "
            f"samples/s ({stream_sps / raw_sps:.2f}x raw GET; cache limit {a.cache_mb:g} MB, "
            f"{remote.remote_mb:,.0f} MB fetched, hit fraction {remote.hit_fraction:.2f})"
        )
        if lit is not None:
            sps = lit["samples_per_s"]
            print(
                f"  litdata, cache cold     {sps * sample_bytes / 1e6:8,.0f} MB/s = {sps:10,.0f} samples/s "
                f"({sps / raw_sps:.2f}x raw GET; optimize {lit['optimize_s']:.1f} s)"
            )
        loader.close()
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
