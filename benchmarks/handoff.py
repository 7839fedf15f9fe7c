"""The batch hand-off probe: how fast batches cross from worker processes, the stock way and the project's.

    python -m benchmarks.handoff                     # LFW-shaped float32, 13,233 samples, batch 64, 2 workers
    python -m benchmarks.handoff --workers 1 2 --batch-size 256 --passes 5

One page-cached ``memmap`` export of LFW-shaped samples (62x47 float32), its 80% train split, steady-state
samples/s (after each pass's first batch) of:

- ``serial``: the project's loader with 0 workers (batches gathered in this process) -- the baseline;
- ``stock ready``: torch's DataLoader whose workers only return a ready batch of that size (the hand-off
  alone: a new shared-memory segment per batch);
- ``stock memmap``: torch's DataLoader reading the same Dataset in its workers, as the project did before;
- ``project``: the project's loader with workers (pipeline/training/handoff/): batches assembled into slots
  of a ring of shared memory allocated once.

Passes of the set-ups are interleaved and the median is taken, so a change in the machine's load hits every
set-up alike; the load average and the cores are printed with the figures.
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
from pipeline.data.storage.memmap import MemmapConfig
from pipeline.training.loading import EpochLoader, build_loader


class Ready(torch.utils.data.Dataset):
    """Each batch a ready tensor: the workers do nothing but hand it over."""

    def __init__(self, n: int, batch: int, shape) -> None:
        self.n, self.batch = n, torch.zeros((batch, *shape), dtype=torch.float32)

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, idx):
        return self.batch[: len(idx)], torch.zeros(len(idx), dtype=torch.int64)


def steady(loader) -> float:
    """Samples/s of one pass after its first batch."""
    it = iter(loader)
    first = next(it)
    n, t0 = 0, time.perf_counter()
    for _x, y in it:
        n += len(y)
    del first
    return n / (time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=13_233)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[2])
    ap.add_argument("--passes", type=int, default=7)
    a = ap.parse_args(argv)
    pipeline.config.register()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-handoff-") as tmp:
        src = OmegaConf.structured(SyntheticConfig(num_samples=a.samples, shape=[62, 47], num_classes=5749))
        storage = OmegaConf.structured(MemmapConfig())
        exp = export(src, storage, tmp)
        n = int(a.samples * 0.8)
        ds = exp.dataset(np.arange(n), storage)
        cpu = torch.device("cpu")

        def project(workers: int):
            cfg = LoaderConfig(
                batch_size=a.batch_size, num_workers=workers, persistent_workers=True, pin_memory="false"
            )
            return build_loader(ds, OmegaConf.structured(cfg), seed=0, train=True, device=cpu)

        setups = {"serial": project(0)}
        for w in a.workers:
            common = dict(num_workers=w, persistent_workers=True, multiprocessing_context="fork")
            sampler = torch.utils.data.BatchSampler(range(n), a.batch_size, drop_last=False)
            setups[f"stock ready w{w}"] = DataLoader(
                Ready(n, a.batch_size, (62, 47)), batch_sampler=sampler, collate_fn=lambda b: b, **common
            )
            setups[f"stock memmap w{w}"] = DataLoader(
                ds,
                batch_sampler=ds.batch_sampler(a.batch_size, True, False, 0),
                collate_fn=lambda b: b,
                **common,
            )
            setups[f"project w{w}"] = project(w)
        for loader in setups.values():
            steady(loader)  # warm-up: workers started, pages mapped
        rates: dict = {k: [] for k in setups}
        for _ in range(a.passes):
            for name, loader in setups.items():
                rates[name].append(steady(loader))
        base = statistics.median(rates["serial"])
        load = os.getloadavg()[0]
        print(
            f"{a.samples:,} LFW-shaped float32 samples (train {n:,}), batch {a.batch_size}, warm page cache, "
            f"{os.cpu_count()} cores, load average {load:.2f}; steady samples/s, median of {a.passes} passes"
        )
        for name, r in rates.items():
            med = statistics.median(r)
            spread = f"(passes {min(r):,.0f}-{max(r):,.0f})"
            print(f"  {name:18s} {med:>12,.0f}  {med / base:5.2f}x serial   {spread}")
        for loader in setups.values():
            if isinstance(loader, EpochLoader):
                loader.close()


if __name__ == "__main__":
    main()
