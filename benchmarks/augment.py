"""What per-sample augmentation costs, and how it spreads: loader throughput with and without flip/crop, with
0 workers, decode threads and workers.

    python -m benchmarks.augment                          # 13,233 x 62x47 uint8, memmap, batch 64
    python -m benchmarks.augment --num-samples 20000 --shape 64 64 3 --dtype float32 --passes 5

An LFW-shaped synthetic export (memmap, in ``--data-dir``) is read through pipeline.training.loading's
train loader, one batch of ``--batch-size`` at a time (steady samples/s after each pass's first batch,
median of ``--passes`` passes after a warm-up pass, the set-ups' passes interleaved), in each parallel
setting -- 0 workers, 0 workers + 2 decode threads, 2 workers -- with:

- ``none``: no augmentation (the baseline of its setting);
- ``flip_crop``: ``transform=flip_crop``'s flip + padded crop, per sample where the batch is assembled
  (pipeline/training/handoff/assemble.py), seeded per (seed, epoch, sample id);

plus the op alone over in-RAM samples (the ceiling of one core).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pipeline.config.schema import LoaderConfig
from pipeline.data.export import export
from pipeline.data.sources.synthetic import SyntheticConfig
from pipeline.data.storage.memmap import MemmapConfig as MemmapStorageConfig
from pipeline.training.loading import build_loader
from pipeline.training.transforms import Augment, uniforms


def one_pass(loader) -> float:
    """Steady samples/s: after the pass's first batch."""
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for _x, y in it:
        n += len(y)
    return n / (time.perf_counter() - t0)


def rates(loaders: dict, passes: int) -> dict:
    """Median samples/s of each loader; passes interleaved (one of each in turn) so that a change
    in the machine's load hits every set-up alike."""
    for loader in loaders.values():
        one_pass(loader)  # warm-up
    got: dict = {name: [] for name in loaders}
    for _ in range(passes):
        for name, loader in loaders.items():
            got[name].append(one_pass(loader))
    return {name: statistics.median(v) for name, v in got.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-samples", type=int, default=13_233)
    ap.add_argument("--shape", type=int, nargs="+", default=[62, 47])
    ap.add_argument("--dtype", choices=["uint8", "float32"], default="uint8")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--padding", type=int, default=4)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--data-dir", type=Path, default=None, help="where the export goes (default: a temp dir)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    src = OmegaConf.structured(
        SyntheticConfig(num_samples=a.num_samples, shape=a.shape, num_classes=10, dtype=a.dtype)
    )
    with tempfile.TemporaryDirectory(prefix="bench-augment-") as tmp:
        exp = export(src, OmegaConf.structured(MemmapStorageConfig()), a.data_dir or tmp)
        dataset = exp.dataset(np.arange(a.num_samples))
        augment = Augment(flip=True, padding=a.padding)
        cpu = torch.device("cpu")
        rows = []
        for workers, threads in ((0, 0), (0, 2), (2, 0)):
            cfg = OmegaConf.structured(
                LoaderConfig(batch_size=a.batch_size, num_workers=workers, decode_threads=threads)
            )
            setups = {
                "none": build_loader(dataset, cfg, seed=0, train=True, device=cpu),
                "flip_crop": build_loader(dataset, cfg, seed=0, train=True, device=cpu, transform=augment),
            }
            for where, sps in rates(setups, a.passes).items():
                rows.append((where, workers, threads, sps))
            for loader in setups.values():
                loader.close()
        x = dataset.__getitems__(list(range(a.batch_size)))[0].numpy()
        out = np.empty_like(x)
        u = uniforms(0, 0, np.arange(len(x)), augment.draws)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            for j in range(len(x)):
                augment.apply(x[j], out[j], u[j])
            n += len(x)
        alone = n / (time.perf_counter() - t0)
    shape = "x".join(map(str, a.shape))
    print(
        f"{a.num_samples} samples of {shape} {a.dtype}, memmap, batch {a.batch_size}, "
        f"flip + crop (padding {a.padding})"
    )
    print(f"{'augment':9s} {'workers':>7s} {'threads':>7s} {'samples/s':>10s} {'vs none':>8s}")
    base = {(w, t): s for where, w, t, s in rows if where == "none"}
    for where, w, t, s in rows:
        print(f"{where:9s} {w:>7d} {t:>7d} {s:>10,.0f} {s / base[(w, t)]:>7.2f}x")
    print(f"the op alone, one in-RAM batch at a time: {alone:,.0f} samples/s ({1e6 / alone:.2f} us a sample)")


if __name__ == "__main__":
    main()
