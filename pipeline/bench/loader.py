"""Loader benchmark: how fast each storage format feeds batches, without a model.

    python -m pipeline.bench                                     # conf/bench.yaml: LFW-shaped data
    python -m pipeline.bench bench.num_workers=[0,2] bench.thread_prefetch=[0,4] bench.batch_sizes=[64,256]
    python -m pipeline.bench 'bench.num_workers=[0,2]' 'bench.decode_threads=[0,2]' 'bench.storages=[encoded]'
    python -m pipeline.bench storage=shards storage.shard_size_mb=8 storage.shuffle_buffer_shards=2
    python -m pipeline.bench -m source.num_samples=13233,100000  # a Hydra sweep: one bench per point
    python -m pipeline.bench bench.cache=cold bench.memory_limit_mb=512 source.num_samples=100000

For the source, every storage format in ``bench.storages`` x num_workers x batch size x thread
prefetch depth x decode threads is exported once (reused from ``paths.data_dir``), then its train-split
loader (built by pipeline.training.loading exactly as training builds it) is read for one warm-up pass and
then timed passes (at least ``bench.min_passes`` and ``bench.min_seconds``; rates are medians over
passes). ``samples_per_s`` is each pass's steady rate, after its start-up -- the first batch, and with
workers the first batch of every worker (``first_batch_ms`` holds the first: workers starting, the first
read) -- so a small data set does not make workers look slow;
``pass_samples_per_s`` is the whole pass's. Two baselines run in the same process: the classic per-sample
``pt`` format (0 workers, no
prefetch, same batch size) and ``numpy_ram``, a plain gather of the same kind of batches from an
in-RAM numpy array with no DataLoader (the practical ceiling). Each timed pass is paired with a pass
of that gather, and ``ratio_vs_ram`` divides by the paired passes' median, so a load spike on a
shared machine moves both sides of the ratio. A third figure is the disk: before the grid, the largest
file of the exports is read sequentially, cold (pipeline.system.disk), and ``ratio_vs_disk`` divides
samples/s by that bandwidth expressed in samples/s of the row's ``bytes_per_sample``.

Conditions (pipeline/bench/conditions.py): ``bench.cache=warm`` (default) measures after a warm-up pass
with the data in the page cache; ``bench.cache=cold`` drops the export's pages before every pass (no
warm-up; the first batch latency is a cold one) and builds a fresh loader for it.
``bench.memory_limit_mb`` runs every pass of a point inside a memory-capped cgroup (where none can be
created, a logged line says why and the passes run uncapped; ``memory_limit_mb`` is then empty in the
CSV). The in-RAM gather paired with a pass always runs warm and outside the cgroup, after the pass and
before the next drop: it is the same ceiling in every condition, so ``ratio_vs_ram`` of a cold or capped
point reads as "how far below the in-memory ceiling", measured under the same machine load.

Output (written by pipeline/bench/cli.py and pipeline/bench/report.py), in the run dir and in an MLflow
run: ``results.csv`` (one row per point: samples/s, MB/s of samples as delivered (decoded),
``bytes_per_sample`` (the export's data files over its samples: bytes on disk per sample), peak
``memory/used_mb`` and mapped file MB from pipeline.system.memory, first-batch latency, shuffle quality,
the export's build time, ratios to the baselines and the disk, ``disk_read_mb`` per timed pass (main
process + workers, pipeline.system.iocount), ``read_amplification`` (those bytes / the stored bytes of
the samples delivered: an ``encoded`` sample's record), the conditions and the cgroup's peak) and
``results.png``.

Extending the grid: a field of ``BenchOptions`` (pipeline/bench/schema.py), a loop in ``run_bench`` and,
for a new figure, a column in pipeline/bench/report.py.
"""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.bench.conditions import Passes
from pipeline.bench.report import RAM, describe
from pipeline.bench.schema import storage_options
from pipeline.data.export import LABELS, export
from pipeline.data.partition import partition
from pipeline.data.sampling import RandomBatchSampler, shuffle_quality
from pipeline.data.sources import build_source
from pipeline.system.disk import DiskRead, largest_file, sequential_read
from pipeline.system.memory import MemorySampler
from pipeline.tracking.store import TrackedRun
from pipeline.training.loading import build_loader

log = logging.getLogger(__name__)

MB = 1024 * 1024
CPU = torch.device("cpu")


class RamGather:
    """The ceiling: batches gathered from an in-RAM numpy array with no DataLoader around it, from
    the same kind of sampler as memmap's (a uniform shuffle, indices sorted within each batch)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> None:
        self.x, self.y = x, y
        self.sampler = RandomBatchSampler(len(y), batch_size, True, False, seed)

    def __iter__(self):
        x, y = self.x, self.y
        for request in self.sampler:
            idx = request.positions
            yield torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


def _one_pass(loader) -> float:
    """Samples/s of one full pass."""
    n, t0 = 0, time.perf_counter()
    for _x, y in loader:
        n += len(y)
    return n / (time.perf_counter() - t0)


def measure(passes: Passes, ram: RamGather | None, b, held_mb: float = 0.0, sample_bytes: int = 0) -> dict:
    """Warm: first-batch latency and a warm-up pass, then timed passes; cold: timed passes only (the
    first one's first batch gives the latency). Each timed pass is paired with a pass of the in-RAM
    gather so that the ratio holds however the machine's load drifts. Rates are medians over passes;
    ``held_mb`` (the in-RAM baseline's array, held meanwhile) is left out of memory; disk bytes are per
    timed pass, and over the sample bytes the timed passes delivered."""
    rates, ram_rates = [], []
    disk = delivered = 0
    with MemorySampler(interval_s=0.1) as memory:
        first_ms = None if passes.cold else passes.run().first_batch_ms  # warm: the warm-up pass
        seconds = 0.0
        whole = []
        while len(rates) < b.max_passes and (len(rates) < b.min_passes or seconds < b.min_seconds):
            p = passes.run()
            first_ms = p.first_batch_ms if first_ms is None else first_ms
            rates.append(p.steady_samples_per_s)
            whole.append(p.samples_per_s)
            seconds += p.seconds
            disk, delivered = disk + p.disk_bytes, delivered + p.samples * sample_bytes
            if ram is not None:
                ram_rates.append(_one_pass(ram))
        memory.sample()
    sps = float(np.median(rates))
    return {
        "samples_per_s": sps,
        "pass_samples_per_s": float(np.median(whole)),
        "ratio_vs_ram": sps / float(np.median(ram_rates)) if ram is not None else 1.0,
        "first_batch_ms": first_ms,
        "passes": len(rates),
        "seconds": seconds,
        "peak_used_mb": memory.peak["used_mb"] - held_mb,
        "peak_mapped_file_mb": memory.peak["mapped_file_mb"],
        "cache": "cold" if passes.cold else "warm",
        "disk_read_mb": disk / 1e6 / len(rates),
        "read_amplification": disk / delivered if delivered else 0.0,
    }


def measure_disk(exports: list) -> DiskRead:
    """Sequential cold read bandwidth of the largest file of the exports."""
    disk = sequential_read(largest_file([exp.root for exp in exports]))
    log.info(
        "bench: disk: %s read sequentially, cold: %.0f MB in %.2f s = %.0f MB/s (%.0f%% from the device)",
        disk.path.name,
        disk.bytes / 1e6,
        disk.seconds,
        disk.mb_per_s,
        100 * disk.from_disk,
    )
    if disk.from_disk < 0.9:
        log.warning("bench: %s stayed in the page cache: ratio_vs_disk is against the cache", disk.path)
    return disk


def epoch_order(loader) -> np.ndarray:
    """Epoch 0's positions in batch order (the sampler's ``order``: nothing is read)."""
    return loader.sampler.order(0)


def ram_train_set(source_cfg, train_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The train samples in one in-RAM array, read chunk by chunk from the source."""
    source = build_source(source_cfg)
    x = np.empty((len(train_ids), *source.spec.shape), dtype=np.dtype(source.spec.dtype))
    y = np.empty(len(train_ids), dtype=np.int64)
    start = 0
    for cx, cy in source.chunks():
        lo, hi = np.searchsorted(train_ids, [start, start + len(cy)])
        x[lo:hi] = cx[train_ids[lo:hi] - start]
        y[lo:hi] = cy[train_ids[lo:hi] - start]
        start += len(cy)
    return x, y


def run_bench(cfg: DictConfig, tr: TrackedRun | None = None) -> list[dict]:
    b = cfg.bench
    torch.manual_seed(b.seed)
    storages = list(dict.fromkeys(["pt", *b.storages]))  # pt is a baseline
    rows: list[dict] = []
    x = y = None
    exports = {}
    for name in storages:
        scfg = storage_options(name, cfg.storage)
        exp = export(cfg.source, scfg, cfg.paths.data_dir)
        log.info("bench: %s export %s (%.1f s)", name, exp.root.name, exp.manifest["export_seconds"])
        if tr is not None:
            tr.log_metrics({f"export_seconds.{name}": exp.manifest["export_seconds"]})
        exports[name] = (scfg, exp)
    disk = measure_disk([exp for _, exp in exports.values()])
    if tr is not None:
        tr.log_metrics({"disk/sequential_mb_per_s": disk.mb_per_s})
    for name, (scfg, exp) in exports.items():
        split = partition(exp.labels, cfg.split)
        stored = exp.stored_sample_bytes  # what a read of one sample fetches at best (encoded: its record)
        on_disk = data_bytes_per_sample(exp)
        if x is None:
            x, y = ram_train_set(cfg.source, split.train)
            held_mb = (x.nbytes + y.nbytes) / MB
            rams = {bs: RamGather(x, y, bs, b.seed) for bs in b.batch_sizes}
        grid = list(itertools.product(b.num_workers, b.batch_sizes, b.thread_prefetch, b.decode_threads))
        if name == "pt":  # the classic recipe's baseline point per batch size, plus the grid if asked
            baseline = [(0, bs, 0, 0) for bs in b.batch_sizes]
            grid = list(dict.fromkeys(baseline + (grid if "pt" in b.storages else [])))
        for workers, batch_size, prefetch, threads in grid:
            point = {
                "num_workers": workers,
                "batch_size": batch_size,
                "thread_prefetch": prefetch,
                "decode_threads": threads,
            }
            loader_cfg = OmegaConf.merge(cfg.loader, {**point, "shuffle": True})

            def make(loader_cfg=loader_cfg, exp=exp, scfg=scfg, ids=split.train):  # a fresh Dataset each time
                return build_loader(exp.dataset(ids, scfg), loader_cfg, seed=b.seed, train=True, device=CPU)

            row = {"storage": name, "num_workers": workers, "batch_size": batch_size, "prefetch": prefetch}
            row["decode_threads"] = threads
            with Passes(make, b.cache, b.memory_limit_mb, drop=[exp.root], workers=workers) as passes:
                row.update(measure(passes, rams[batch_size], b, held_mb, stored))
            row["memory_limit_mb"] = passes.limit_applied_mb
            row["cgroup_peak_mb"] = passes.cgroup_peak_mb
            row["shuffle_quality"] = shuffle_quality(epoch_order(passes.loader))
            row["export_seconds"] = exp.manifest["export_seconds"]
            row["bytes_per_sample"] = on_disk
            row["sample_bytes"] = exp.spec.sample_bytes  # as delivered (decoded)
            rows.append(row)
            log.info("bench: %s", describe(row))
    for batch_size, ram in rams.items():
        row = {"storage": RAM, "num_workers": 0, "batch_size": batch_size, "prefetch": 0, "decode_threads": 0}
        row["bytes_per_sample"] = row["sample_bytes"] = x[0].nbytes  # in memory, not on disk
        row.update(measure(Passes(lambda ram=ram: ram), None, b, 0.0, x[0].nbytes))  # in RAM: warm, uncapped
        row["shuffle_quality"] = shuffle_quality(epoch_order(ram))
        rows.append(row)
        log.info("bench: %s", describe(row))
    for row in rows:
        row["mb_per_s"] = row["samples_per_s"] * row.pop("sample_bytes") / 1e6  # samples as delivered
        row["ratio_vs_pt"] = row["samples_per_s"] / _find(rows, "pt", row["batch_size"])["samples_per_s"]
        disk_samples_per_s = disk.mb_per_s * 1e6 / row["bytes_per_sample"]  # the format's bytes, in order
        row["ratio_vs_disk"] = row["samples_per_s"] / disk_samples_per_s if disk_samples_per_s else 0.0
        row["disk_mb_per_s"] = disk.mb_per_s
    return rows


def data_bytes_per_sample(exp) -> float:
    """The export's files (labels.npy left out) over its samples: what one sample costs on disk."""
    data = exp.manifest["files"]["bytes"] - (exp.root / LABELS).stat().st_size
    return data / max(len(exp.labels), 1)


def _find(rows: list[dict], storage: str, batch_size: int) -> dict:
    return next(
        r
        for r in rows
        if r["storage"] == storage
        and r["batch_size"] == batch_size
        and r["num_workers"] == 0
        and not r["prefetch"]
    )
