"""Reader benchmark: the array formats' readers warm and out of core, beside the readers they replace.

    python -m benchmarks.readers                                    # 250,000 samples, 1 GiB cgroup
    python -m benchmarks.readers --samples 13233 --warm-only        # LFW-sized, page cache warm
    python -m benchmarks.readers --points memmap memmap-plain pt --limit-mb 512 --samples 100000
    python -m benchmarks.readers --points memmap shards-memory disk --workers 0 2 --cold-only  # workers

Exports LFW-shaped synthetic samples (62x47 float32, 11,656 bytes) as ``memmap``,
``shards`` and (for ``pt``) one file per sample under ``--data-dir`` (reused across runs), then measures each
point in a fresh child process through the training loader (``build_loader``, batch 64, 0 workers):

- **warm**: one untimed pass, then the median of ``--passes`` timed passes (the page cache holds the data);
- **cold** (root): the child joins a memory cgroup of ``--limit-mb`` (pipeline.system.cgroups; the page
  cache is charged), the export's pages are dropped (pipeline.system.page_cache), one pass of at most
  ``--seconds``. The data should be at least twice the limit so that it cannot be cached.

Points: ``memmap`` (this checkout's reader), ``memmap-plain`` (the same file through
``np.load(mmap_mode="r")``, one sorted fancy index per batch: the reader before), ``shards-memory`` /
``shards-mapped`` (``storage.buffers``), ``pt`` (one ``torch.save`` file per sample), ``disk``: 4 MiB reads of
the shard files (the disk's sequential bandwidth, the ceiling of a sequential reader). Printed: samples/s,
MB/s, read amplification (pipeline.system.iocount's disk bytes over the bytes delivered), the ratio to
``pt`` and the ratio of MB/s to ``disk`` in the same run. ``python -m pipeline.bench bench.cache=cold
bench.memory_limit_mb=N`` measures the formats as they are; this compares their readers with the ones before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # children import benchmarks/ from here, wherever they start
POINTS = ("memmap", "memmap-plain", "shards-memory", "shards-mapped", "pt", "disk")
MiB = 2**20


def _exports(args):
    """(memmap export, shards export, pt export or None) for the benchmark's data."""
    from omegaconf import OmegaConf

    import pipeline.config

    pipeline.config.register()
    from pipeline.data.export import export
    from pipeline.data.sources.synthetic import SyntheticConfig
    from pipeline.data.storage.shards import ShardsConfig as ShardsStorageConfig

    source = OmegaConf.structured(
        SyntheticConfig(num_samples=args.samples, shape=[62, 47], num_classes=args.classes)
    )
    shards = OmegaConf.structured(ShardsStorageConfig())
    made = {
        "memmap": export(source, OmegaConf.create({"name": "memmap"}), args.data_dir),
        "shards": export(source, shards, args.data_dir),
    }
    if any(p == "pt" for p in args.points):
        made["pt"] = export(source, OmegaConf.create({"name": "pt"}), args.data_dir)
    return made


class PlainMemmap:
    """The memmap reader before: ``np.load(mmap_mode="r")`` (kernel readahead on), one sorted fancy index per
    batch, behind the same batch sampler."""

    def __init__(self, root: Path, labels, ids) -> None:
        import numpy as np

        from pipeline.data.storage.base import passthrough_collate

        self.collate_fn = passthrough_collate
        self.path, self.ids, self.labels = (
            Path(root) / "samples.npy",
            np.asarray(ids),
            np.asarray(labels)[ids],
        )
        self.array = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitems__(self, idx):
        import numpy as np
        import torch

        if self.array is None:
            self.array = np.load(self.path, mmap_mode="r").view(np.ndarray)
        idx = np.asarray(idx)
        return torch.from_numpy(self.array[self.ids[idx]]), torch.from_numpy(self.labels[idx])

    def batch_sampler(self, batch_size: int, shuffle: bool, drop_last: bool, seed: int):
        from pipeline.data.sampling import RandomBatchSampler

        return RandomBatchSampler(len(self), batch_size, shuffle, drop_last, seed)


def _loader(point: str, exp, workers: int = 0):
    import torch
    from omegaconf import OmegaConf

    from pipeline.config.schema import LoaderConfig, SplitConfig
    from pipeline.data.partition import partition
    from pipeline.training.loading import build_loader

    split = partition(exp.labels, OmegaConf.structured(SplitConfig(stratify=False)))
    if point == "memmap-plain":
        ds = PlainMemmap(exp.root, exp.labels, split.train)
    else:
        storage = OmegaConf.create(exp.manifest["storage"])
        if point.startswith("shards-"):
            storage.buffers = point.split("-", 1)[1]
        ds = exp.dataset(split.train, storage)
    cfg = OmegaConf.structured(LoaderConfig(pin_memory="false", num_workers=workers))
    return build_loader(ds, cfg, seed=0, train=True, device=torch.device("cpu"))


def _disk(exp, seconds: float) -> tuple[int, float]:
    """Bytes read and seconds taken reading the shard files front to back in 4 MiB reads."""
    total, t0 = 0, time.perf_counter()
    for path in sorted((exp.root / "shards").glob("shard-*.npy")):
        fd, offset = os.open(path, os.O_RDONLY), 0
        try:
            while time.perf_counter() - t0 < seconds:
                got = len(os.pread(fd, 4 << 20, offset))
                if not got:
                    break
                offset += got
        finally:
            os.close(fd)
        total += offset
        if time.perf_counter() - t0 >= seconds:
            break
    return total, time.perf_counter() - t0


def child(args) -> dict:
    """One point, in this (fresh) process: its figures as a dict."""
    import torch

    torch.set_num_threads(1)
    exps = _exports(args)
    point = args.child
    exp = exps["shards" if point in ("shards-memory", "shards-mapped", "disk") else point.split("-")[0]]
    sample_bytes = 62 * 47 * 4
    if args.cold:
        from pipeline.system.cgroups import MemoryCgroup
        from pipeline.system.iocount import disk_read_bytes
        from pipeline.system.page_cache import drop

        with MemoryCgroup(args.limit_mb * MiB, prefix="pipeline-bench-readers"):
            if point != "disk":
                loader = _loader(point, exp, args.child_workers)  # in the cgroup: buffers=auto sees it
            drop(exp.root)  # nothing of it is mapped yet
            before, t0 = disk_read_bytes(), time.perf_counter()
            if point == "disk":
                delivered, seconds = _disk(exp, args.seconds)
            else:
                n = 0
                for _, y in loader:
                    n += len(y)
                    if time.perf_counter() - t0 > args.seconds:
                        break
                delivered, seconds = n * sample_bytes, time.perf_counter() - t0
            disk = disk_read_bytes() - before
        return {
            "samples_per_s": delivered / sample_bytes / seconds,
            "amplification": disk / max(delivered, 1),
        }
    if point == "disk":
        return {}
    loader = _loader(point, exp, args.child_workers)
    rates = []
    for k in range(args.passes + 1):
        n, t0 = 0, time.perf_counter()
        for _, y in loader:
            n += len(y)
        if k:
            rates.append(n / (time.perf_counter() - t0))
    return {"samples_per_s": statistics.median(rates), "amplification": 0.0}


def run_point(args, point: str, cold: bool, workers: int = 0) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.readers", "--child", point, *sys.argv[1:]]
    cmd += ["--child-workers", str(workers)]
    if cold:
        cmd.append("--cold")
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode < 0:  # e.g. SIGKILL from the cgroup's OOM killer: no message of its own
        return {
            "error": f"killed by signal {-proc.returncode} (in a {args.limit_mb} MiB cgroup: out of memory?)"
        }
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict, sample_bytes: int) -> str:
    lines = [
        "| point | condition | samples/s | MB/s | read amplification | x pt | x disk MB/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for cond in ("warm", "cold"):
        pt = results.get(("pt", cond), {}).get("samples_per_s")
        disk = results.get(("disk", "cold"), {}).get("samples_per_s")
        for point in sorted(
            {p for p, c in results if c == cond}, key=lambda p: (POINTS.index(p.split()[0]), p)
        ):
            r = results.get((point, cond))
            if r is None or (point == "disk" and cond == "warm"):
                continue
            if "error" in r:
                lines.append(f"| {point} | {cond} | failed: {r['error']} | | | | |")
                continue
            rate = r["samples_per_s"]
            amp = f"{r['amplification']:.2f}" if cond == "cold" else "-"
            vs_pt = f"{rate / pt:.1f}" if pt and point != "disk" else "-"
            vs_disk = f"{rate / disk:.2f}" if disk and cond == "cold" else "-"
            mb = rate * sample_bytes / 1e6
            lines.append(f"| {point} | {cond} | {rate:,.0f} | {mb:,.0f} | {amp} | {vs_pt} | {vs_disk} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=250_000)
    p.add_argument("--classes", type=int, default=5749)
    p.add_argument("--limit-mb", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=15.0, help="longest cold pass")
    p.add_argument("--passes", type=int, default=3, help="timed warm passes")
    p.add_argument("--points", nargs="+", default=list(POINTS), choices=POINTS)
    p.add_argument("--warm-only", action="store_true")
    p.add_argument("--cold-only", action="store_true")
    p.add_argument("--data-dir", type=Path, default=Path("outputs/data"))
    p.add_argument("--workers", type=int, nargs="+", default=[0], help="loader workers: each point with each")
    p.add_argument("--child", choices=POINTS, help=argparse.SUPPRESS)
    p.add_argument("--child-workers", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    _exports(args)  # once, here, not in the children
    results = {}
    for cond in [
        c for c in ("warm", "cold") if not (c == "warm" and args.cold_only or c == "cold" and args.warm_only)
    ]:
        for point in args.points:
            if point == "disk" and cond == "warm":
                continue
            for w in args.workers if point not in ("disk", "memmap-plain") else [0]:
                name = point if w == 0 else f"{point} w{w}"
                results[(name, cond)] = run_point(args, point, cond == "cold", w)
                print(f"{name:14s} {cond}: {results[(name, cond)]}", file=sys.stderr, flush=True)
    data_mb = args.samples * 62 * 47 * 4 / 1e6
    print(f"\n{args.samples:,} LFW-shaped samples ({data_mb:,.0f} MB); cold: {args.limit_mb} MiB cgroup")
    print(table(results, 62 * 47 * 4))


if __name__ == "__main__":
    main()
