"""Batches to a GPU: the project's page-locked slots against pinning each batch, and the data arrives intact.

    python -m benchmarks.cuda_handoff                       # needs CUDA
    python -m benchmarks.cuda_handoff --workers 0 2 4 8 --samples 50000

Each set-up copies every batch of a page-cached export to the GPU with ``x.to("cuda", non_blocking=True)``
while the GPU reduces the batch before it (a float64 sum per batch, on the GPU), as a training step would
overlap them. Printed: steady samples/s (after the first batch), whether the batches arrived page-locked, and
whether the per-batch sums equal those of 0 workers bit for bit -- a slot reused while its copy was still in
flight would change them. Set-ups: the project's loader with 0 workers (each batch pinned by a copy), with
W workers (batches in slots page-locked once), and torch's DataLoader with ``pin_memory=True`` (its pin
thread copies each batch) reading the same Dataset.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import pipeline.config
from pipeline.config.schema import LoaderConfig
from pipeline.data.export import export
from pipeline.data.sources.synthetic import SyntheticConfig
from pipeline.data.storage.shards import ShardsConfig
from pipeline.training.loading import EpochLoader, build_loader


def run(loader, dev) -> tuple[float, list[float], bool]:
    """(steady samples/s, per-batch sums, every batch pinned)."""
    sums, pinned = [], True
    it = iter(loader)
    x, y = next(it)
    pinned &= bool(x.is_pinned())
    sums.append(x.to(dev, non_blocking=True).sum(dtype=torch.float64))
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    for x, y in it:
        pinned &= bool(x.is_pinned())
        sums.append(x.to(dev, non_blocking=True).sum(dtype=torch.float64))
        n += len(y)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), [float(s) for s in sums], pinned


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=30_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4, 8])
    ap.add_argument("--passes", type=int, default=3)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA here: this benchmark copies to a GPU")
    pipeline.config.register()
    torch.set_num_threads(1)
    dev = torch.device("cuda")
    with tempfile.TemporaryDirectory(prefix="bench-cuda-") as tmp:
        src = OmegaConf.structured(SyntheticConfig(num_samples=a.samples, shape=[62, 47], num_classes=100))
        storage = OmegaConf.structured(ShardsConfig(shard_size_mb=16, buffers="mapped"))
        exp = export(src, storage, tmp)
        ds = exp.dataset(np.arange(a.samples), storage)
        setups = {}
        for w in a.workers:
            cfg = LoaderConfig(batch_size=a.batch_size, num_workers=w, pin_memory="auto")
            setups[f"project w{w}"] = build_loader(
                ds, OmegaConf.structured(cfg), seed=0, train=True, device=dev
            )
        for w in [w for w in a.workers if w > 0][-1:]:
            stock_sampler = ds.batch_sampler(a.batch_size, True, False, 0)
            setups[f"torch pin_memory w{w}"] = DataLoader(
                ds,
                batch_sampler=stock_sampler,
                collate_fn=lambda b: b,
                num_workers=w,
                pin_memory=True,
                persistent_workers=True,
                multiprocessing_context="fork",
            )
        results = {k: [] for k in setups}
        sums = {}
        for p in range(a.passes + 1):
            for name, loader in setups.items():
                if isinstance(loader, DataLoader):
                    loader.batch_sampler.set_epoch(p)
                rate, s, pinned = run(loader, dev)
                if p:
                    results[name].append(rate)
                sums.setdefault(name, []).append((s, pinned))
        ref = sums[f"project w{a.workers[0]}"]
        print(
            f"{a.samples:,} LFW-shaped float32 samples, batch {a.batch_size}, shards (mapped, page-cached) "
            f"-> {torch.cuda.get_device_name()}; {os.cpu_count()} cores; steady samples/s, median of "
            f"{a.passes}"
        )
        for name, rates in results.items():
            same = all(s == r for (s, _), (r, _) in zip(sums[name], ref))
            pinned = all(p for _, p in sums[name])
            print(
                f"  {name:22s} {statistics.median(rates):>12,.0f}  pinned={pinned}  "
                f"batches identical to {a.workers[0]} workers: {same}"
            )
        for loader in setups.values():
            if isinstance(loader, EpochLoader):
                loader.close()


if __name__ == "__main__":
    main()
