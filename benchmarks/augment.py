"""Where should batched augmentation run? Loader throughput with flip/crop in the main process vs in workers.

    python -m benchmarks.augment                          # 13,233 x 62x47 uint8, memmap, batch 64
    python -m benchmarks.augment --num-samples 20000 --shape 64 64 3 --dtype float32 --passes 5

An LFW-shaped synthetic export (memmap, in ``--data-dir``) is read through pipeline.training.loading's
train DataLoader, one batch of ``--batch-size`` at a time, in these set-ups (samples/s, median of
``--passes`` passes after a warm-up pass, the set-ups' passes interleaved):

- ``none``: no augmentation (the baseline);
- ``main``: ``transform=flip_crop``'s flip + padded crop on each whole batch in the main process,
  after the loader (what the pipeline does; with ``thread_prefetch`` inside the prefetch thread);
- ``workers``: the same op inside the Dataset's ``__getitems__``, i.e. in the DataLoader workers
  when there are workers (what decode-heavy formats do with their decode);

each with 0 and 2 workers (and thread prefetch 4 with 0 workers), plus the op alone on an in-RAM
batch (the ceiling). The ``workers`` set-up here seeds each batch from its first sample id, which is
enough to time it but is not the (seed, epoch, batch) seeding the pipeline guarantees.
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
from pipeline.data.storage.base import BatchedDataset
from pipeline.data.storage.memmap import MemmapConfig as MemmapStorageConfig
from pipeline.training.loading import build_loader
from pipeline.training.transforms import FlipCrop


class AugmentInGetitems(BatchedDataset):
    """A batched Dataset whose ``__getitems__`` augments the batch it read (so: in the worker)."""

    def __init__(self, inner, augment: FlipCrop) -> None:
        self.inner, self.augment = inner, augment
        self.spec, self.ids, self.labels = inner.spec, inner.ids, inner.labels

    def batch_sampler(self, *args):
        return self.inner.batch_sampler(*args)

    def read_into(self, request, out) -> None:
        self.inner.read_into(request, out)

    def __getitems__(self, indices):
        x, y = self.inner.__getitems__(indices)
        return self.augment(x, torch.Generator().manual_seed(int(list(indices)[0]))), y


def one_pass(loader) -> float:
    n, t0 = 0, time.perf_counter()
    for _x, y in loader:
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
        augment = FlipCrop(flip=True, padding=a.padding)
        cpu = torch.device("cpu")
        rows = []
        for workers, prefetch in ((0, 0), (0, 4), (2, 0)):
            cfg = OmegaConf.structured(
                LoaderConfig(batch_size=a.batch_size, num_workers=workers, thread_prefetch=prefetch)
            )
            setups = {
                "none": build_loader(dataset, cfg, seed=0, train=True, device=cpu),
                "main": build_loader(dataset, cfg, seed=0, train=True, device=cpu, augment=augment),
                "workers": build_loader(
                    AugmentInGetitems(dataset, augment), cfg, seed=0, train=True, device=cpu
                ),
            }
            for where, sps in rates(setups, a.passes).items():
                rows.append((where, workers, prefetch, sps))
        x = torch.from_numpy(np.asarray(dataset.__getitems__(list(range(a.batch_size)))[0]))
        g = torch.Generator().manual_seed(0)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            augment(x, g)
            n += len(x)
        alone = n / (time.perf_counter() - t0)
    shape = "x".join(map(str, a.shape))
    print(
        f"{a.num_samples} samples of {shape} {a.dtype}, memmap, batch {a.batch_size}, "
        f"flip + crop (padding {a.padding})"
    )
    print(f"{'augment':8s} {'workers':>7s} {'prefetch':>8s} {'samples/s':>10s} {'vs none':>8s}")
    base = {(w, p): s for where, w, p, s in rows if where == "none"}
    for where, w, p, s in rows:
        print(f"{where:8s} {w:>7d} {p:>8d} {s:>10,.0f} {s / base[(w, p)]:>7.2f}x")
    print(f"the op alone, one in-RAM batch at a time: {alone:,.0f} samples/s ({1e6 / alone:.2f} us a sample)")


if __name__ == "__main__":
    main()
