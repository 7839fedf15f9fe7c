"""Loader benchmark: how fast each storage format feeds batches, without a model.

    python -m pipeline.bench                                     # conf/bench.yaml: LFW-shaped data
    python -m pipeline.bench bench.num_workers=[0,2] bench.thread_prefetch=[0,4] bench.batch_sizes=[64,256]
    python -m pipeline.bench storage=shards storage.shard_size_mb=8 storage.shuffle_buffer_shards=2
    python -m pipeline.bench -m source.num_samples=13233,100000  # a Hydra sweep: one bench per point
    python -m pipeline.bench bench.cache=cold bench.memory_limit_mb=512 source.num_samples=100000

For the source, every storage format in ``bench.storages`` x num_workers x batch size x thread
prefetch depth is exported once (reused from ``paths.data_dir``), then its train-split DataLoader
(built by pipeline.training.loading exactly as training builds it) is read for one warm-up pass and then
timed passes (at least ``bench.min_passes`` and ``bench.min_seconds``; rates are medians over
passes). Two baselines run in the same process: the classic per-sample ``pt`` format (0 workers, no
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

Output, in the run dir and in an MLflow run: ``results.csv`` (one row per point: samples/s, MB/s of
samples as delivered (decoded), ``bytes_per_sample`` (the export's data files over its samples: bytes on
disk per sample), peak ``memory/used_mb`` and mapped file MB from pipeline.system.memory, first-batch
latency, shuffle quality, the export's build time, ratios to the baselines and the disk, ``disk_read_mb``
per timed pass (main process + workers, pipeline.system.iocount), ``read_amplification`` (those bytes /
the stored bytes of the samples delivered: an ``encoded`` sample's record), the conditions and the
cgroup's peak) and ``results.png``.
"""

from __future__ import annotations

import csv
import itertools
import logging
import os
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

import pipeline.config
from pipeline import progress
from pipeline.bench.conditions import Passes
from pipeline.config.resolvers import CONF_DIR
from pipeline.config.schema import MLPConfig, TrainerConfig, register_bench
from pipeline.config.validate import ConfigError, _check, _is_int, validate
from pipeline.data.export import export
from pipeline.data.partition import partition
from pipeline.data.sampling import RandomBatchSampler, shuffle_quality
from pipeline.data.sources import build_source
from pipeline.data.storage import formats
from pipeline.system.disk import DiskRead, largest_file, sequential_read
from pipeline.system.memory import MemorySampler
from pipeline.tracking.lineage import git_info
from pipeline.tracking.store import TrackedRun, flatten, prepare_store
from pipeline.tracking.sweep import PARENT_ENV
from pipeline.training.loading import build_loader

log = logging.getLogger(__name__)

MB = 1024 * 1024
CPU = torch.device("cpu")
RAM = "numpy_ram"
COLUMNS = [
    "storage",
    "num_workers",
    "batch_size",
    "prefetch",
    "samples_per_s",
    "mb_per_s",
    "bytes_per_sample",
    "peak_used_mb",
    "peak_mapped_file_mb",
    "first_batch_ms",
    "passes",
    "seconds",
    "shuffle_quality",
    "export_seconds",
    "ratio_vs_pt",
    "ratio_vs_ram",
    "cache",
    "memory_limit_mb",
    "disk_read_mb",
    "read_amplification",
    "ratio_vs_disk",
    "disk_mb_per_s",
    "cgroup_peak_mb",
]


def validate_bench(cfg: DictConfig) -> None:
    """The main validator on source/storage/split/loader, then the bench grid."""
    full = OmegaConf.create({k: cfg[k] for k in cfg if k not in ("bench", "hydra")})
    full.model = OmegaConf.structured(MLPConfig())  # training-only groups at their defaults
    full.trainer = OmegaConf.structured(TrainerConfig())
    validate(full)
    b = cfg.bench
    for name in b.storages:
        _check(name in formats(), "bench.storages", list(b.storages), f"names from {sorted(formats())}")
    for key, minimum in (("num_workers", 0), ("batch_sizes", 1), ("thread_prefetch", 0)):
        vals = list(b[key])
        _check(
            len(vals) >= 1 and all(_is_int(v) and v >= minimum for v in vals),
            f"bench.{key}",
            vals,
            f"a non-empty list of integers >= {minimum}",
        )
    _check(_is_int(b.min_passes) and b.min_passes >= 1, "bench.min_passes", b.min_passes, "an integer >= 1")
    _check(b.max_passes >= b.min_passes, "bench.max_passes", b.max_passes, ">= bench.min_passes")
    _check(b.min_seconds >= 0, "bench.min_seconds", b.min_seconds, ">= 0")
    limit = b.memory_limit_mb
    _check(
        limit is None or (isinstance(limit, (int, float)) and limit > 0),
        "bench.memory_limit_mb",
        limit,
        "a number of MB > 0, or null for no cap",
    )


def storage_config(name: str, current: DictConfig) -> DictConfig:
    """``current`` for its own format; another format's conf/storage/<name>.yaml on its schema."""
    if name == current.name:
        return current
    raw = OmegaConf.load(CONF_DIR / "storage" / f"{name}.yaml")
    bases = [d for d in raw.get("defaults", []) if isinstance(d, str) and d.startswith("base_")]
    node = ConfigStore.instance().load(f"storage/{bases[0]}.yaml").node if bases else {}
    body = {k: v for k, v in raw.items() if k != "defaults"}
    return OmegaConf.merge(node, body)


class RamGather:
    """The ceiling: batches gathered from an in-RAM numpy array with no DataLoader around it, from
    the same kind of sampler as memmap's (a uniform shuffle, indices sorted within each batch)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> None:
        self.x, self.y = x, y
        self.batch_sampler = RandomBatchSampler(len(y), batch_size, True, False, seed)

    def __iter__(self):
        x, y = self.x, self.y
        for request in self.batch_sampler:
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
        while len(rates) < b.max_passes and (len(rates) < b.min_passes or seconds < b.min_seconds):
            p = passes.run()
            first_ms = p.first_batch_ms if first_ms is None else first_ms
            rates.append(p.samples_per_s)
            seconds += p.seconds
            disk, delivered = disk + p.disk_bytes, delivered + p.samples * sample_bytes
            if ram is not None:
                ram_rates.append(_one_pass(ram))
        memory.sample()
    sps = float(np.median(rates))
    return {
        "samples_per_s": sps,
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


def epoch_order(loader, seed: int) -> np.ndarray:
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


def run_bench(cfg: DictConfig, output_dir: Path, tr: TrackedRun | None = None) -> list[dict]:
    b = cfg.bench
    torch.manual_seed(b.seed)
    storages = list(dict.fromkeys(["pt", *b.storages]))  # pt is a baseline
    rows: list[dict] = []
    x = y = None
    exports = {}
    for name in storages:
        scfg = storage_config(name, cfg.storage)
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
        grid = list(itertools.product(b.num_workers, b.batch_sizes, b.thread_prefetch))
        if name == "pt":  # the classic recipe's baseline point per batch size, plus the grid if asked
            baseline = [(0, bs, 0) for bs in b.batch_sizes]
            grid = list(dict.fromkeys(baseline + (grid if "pt" in b.storages else [])))
        for workers, batch_size, prefetch in grid:
            point = {"num_workers": workers, "batch_size": batch_size, "thread_prefetch": prefetch}
            loader_cfg = OmegaConf.merge(cfg.loader, {**point, "shuffle": True})

            def make(loader_cfg=loader_cfg, exp=exp, scfg=scfg, ids=split.train):  # a fresh Dataset each time
                return build_loader(exp.dataset(ids, scfg), loader_cfg, seed=b.seed, train=True, device=CPU)

            row = {"storage": name, "num_workers": workers, "batch_size": batch_size, "prefetch": prefetch}
            with Passes(make, b.cache, b.memory_limit_mb, drop=[exp.root]) as passes:
                row.update(measure(passes, rams[batch_size], b, held_mb, stored))
            row["memory_limit_mb"] = passes.limit_applied_mb
            row["cgroup_peak_mb"] = passes.cgroup_peak_mb
            row["shuffle_quality"] = shuffle_quality(epoch_order(passes.loader, b.seed))
            row["export_seconds"] = exp.manifest["export_seconds"]
            row["bytes_per_sample"] = on_disk
            row["sample_bytes"] = exp.spec.sample_bytes  # as delivered (decoded)
            rows.append(row)
            log.info("bench: %s", _describe(row))
    for batch_size, ram in rams.items():
        row = {"storage": RAM, "num_workers": 0, "batch_size": batch_size, "prefetch": 0}
        row["bytes_per_sample"] = row["sample_bytes"] = x[0].nbytes  # in memory, not on disk
        row.update(measure(Passes(lambda ram=ram: ram), None, b, 0.0, x[0].nbytes))  # in RAM: warm, uncapped
        row["shuffle_quality"] = shuffle_quality(epoch_order(ram, b.seed))
        rows.append(row)
        log.info("bench: %s", _describe(row))
    for row in rows:
        row["mb_per_s"] = row["samples_per_s"] * row.pop("sample_bytes") / 1e6  # samples as delivered
        row["ratio_vs_pt"] = row["samples_per_s"] / _find(rows, "pt", row["batch_size"])["samples_per_s"]
        disk_samples_per_s = disk.mb_per_s * 1e6 / row["bytes_per_sample"]  # the format's bytes, in order
        row["ratio_vs_disk"] = row["samples_per_s"] / disk_samples_per_s if disk_samples_per_s else 0.0
        row["disk_mb_per_s"] = disk.mb_per_s
    return rows


def data_bytes_per_sample(exp) -> float:
    """The export's files (labels.npy left out) over its samples: what one sample costs on disk."""
    from pipeline.data.export import LABELS

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


def _label(row: dict) -> str:
    if row["storage"] == RAM:
        return f"{RAM} b{row['batch_size']}"
    return f"{row['storage']} w{row['num_workers']} b{row['batch_size']} p{row['prefetch']}"


def _describe(row: dict) -> str:
    return (
        f"{_label(row):28s} {row['samples_per_s']:>12,.0f} samples/s  "
        f"first batch {row['first_batch_ms']:.1f} ms  "
        f"peak used {row['peak_used_mb']:.0f} MB, mapped {row['peak_mapped_file_mb']:.0f} MB, "
        f"{row['cache']}, disk {row['disk_read_mb']:.1f} MB/pass ({row['read_amplification']:.2f}x)"
    )


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return path


TABLE = [  # header, width, format
    ("samples/s", 11, "{samples_per_s:,.0f}"),
    ("MB/s", 7, "{mb_per_s:,.0f}"),
    ("B/sample", 8, "{bytes_per_sample:,.0f}"),
    ("vs pt", 8, "{ratio_vs_pt:.1f}x"),
    ("vs RAM", 7, "{ratio_vs_ram:.2f}x"),
    ("vs disk", 8, "{ratio_vs_disk:.2f}x"),
    ("disk MB", 8, "{disk_read_mb:.1f}"),
    ("read amp", 8, "{read_amplification:.2f}x"),
    ("used MB", 8, "{peak_used_mb:.0f}"),
    ("mapped MB", 9, "{peak_mapped_file_mb:.0f}"),
    ("1st ms", 7, "{first_batch_ms:.1f}"),
    ("shuffle", 7, "{shuffle_quality:.2f}"),
]


def format_table(rows: list[dict]) -> str:
    lines = [f"{'config':28s}" + "".join(f" {h:>{w}s}" for h, w, _ in TABLE)]
    for r in rows:
        lines.append(f"{_label(r):28s}" + "".join(f" {f.format(**r):>{w}s}" for _, w, f in TABLE))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["samples_per_s"])
    names = sorted({r["storage"] for r in rows})
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.8))
    ypos = np.arange(len(rows))
    ax.barh(ypos, [r["samples_per_s"] for r in rows], color=[colors[r["storage"]] for r in rows])
    ax.set_yticks(ypos, [_label(r) for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("samples/s (log scale; w = workers, b = batch size, p = thread prefetch depth)")
    ax.set_title(title)
    top = max(r["samples_per_s"] for r in rows)
    ax.set_xlim(right=top * 8)
    for y, r in zip(ypos, rows):
        ax.text(
            r["samples_per_s"] * 1.05,
            y,
            f"{r['samples_per_s']:,.0f}  ({r['ratio_vs_pt']:.3g}x pt, {r['ratio_vs_ram']:.2g}x RAM)",
            va="center",
            fontsize=8,
        )
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(cfg: DictConfig) -> list[dict]:
    validate_bench(cfg)
    progress.configure(cfg.progress)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    uri = cfg.tracking.uri
    exp_id = prepare_store(uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
    src = cfg.source
    shape = "x".join(str(d) for d in src.get("shape", [])) or src.name
    name = cfg.tracking.run_name or f"bench {src.name} {shape}"
    tags = {"pipeline.role": "bench", **git_info(cfg.paths.root)}
    with TrackedRun(uri, exp_id, name, os.environ.get(PARENT_ENV), tags) as tr:
        tr.log_params(flatten({k: cfg[k] for k in ("source", "storage", "split", "loader", "bench")}))
        rows = run_bench(cfg, output_dir, tr)
        csv_path = write_csv(rows, output_dir / "results.csv")
        b = cfg.bench
        limit = f", {b.memory_limit_mb:g} MB cap" if b.memory_limit_mb is not None else ""
        title = f"{src.name} {shape} ({len(rows)} points): loader throughput, train split, {b.cache}{limit}"
        png = plot(rows, output_dir / "results.png", title)
        log.info("bench results (%s):\n%s", csv_path, format_table(rows))
        for r in rows:
            key = _label(r).replace(" ", "_")
            tr.log_metrics(
                {
                    f"{key}/samples_per_s": r["samples_per_s"],
                    f"{key}/ratio_vs_pt": r["ratio_vs_pt"],
                    f"{key}/ratio_vs_ram": r["ratio_vs_ram"],
                    f"{key}/peak_used_mb": r["peak_used_mb"],
                    f"{key}/disk_read_mb": r["disk_read_mb"],
                    f"{key}/read_amplification": r["read_amplification"],
                    f"{key}/ratio_vs_disk": r["ratio_vs_disk"],
                }
            )
        tr.log_artifact(csv_path)
        tr.log_artifact(png)
        tr.log_artifact(output_dir / ".hydra", "hydra")
    return rows


register_bench()  # conf/bench.yaml extends base_bench
pipeline.config.register()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
def main(cfg: DictConfig) -> float:
    rows = run(cfg)
    tested = [r for r in rows if r["storage"] in cfg.bench.storages] or rows
    return max(r["samples_per_s"] for r in tested)  # the objective for Hydra sweepers


def cli() -> None:
    try:
        main()
    except ConfigError as err:  # Hydra prints the traceback; this keeps the message on top
        raise SystemExit(str(err)) from err
