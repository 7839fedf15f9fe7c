"""Memory scaling benchmark: peak memory of one training epoch per storage format and data size.

    python -m benchmarks.memory                                  # every registered format
    python -m benchmarks.memory --sizes 10000 50000 200000 --formats ram memmap shards npy
    python -m benchmarks.memory --compare-free --samples 50000   # memory/used_mb vs `free`

Each (format, size) is one real run of ``python -m pipeline`` in its own process (synthetic 62x47
float32 samples, one epoch, ``model.hidden=[64]``) tracked in a SQLite store under ``--out``; the
figures are that run's ``memory/peak_used_mb`` and ``memory/peak_mapped_file_mb``. Printed as a
markdown table (with each format's growth from the smallest size) and written to
``<out>/memory_scaling.csv`` and ``<out>/memory_scaling.png``. One-file-per-sample formats (pt, npy)
are slow to export, so they run only up to ``--per-file-max`` samples. Exports are deleted after
each run unless ``--keep-data``.

``--compare-free`` checks the headline figure against the system: it measures MemTotal - MemAvailable
(what ``free`` reports as used) before and while a DataLoader with 2 forked workers iterates a
``storage=ram`` dataset and right after it is released, and prints that difference beside the
difference of ``memory/used_mb`` and of summed RSS. Other processes on the machine move the system
figure too (so the window is kept short): it repeats and prints each.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config.resolvers import PACKAGE_DIR

SAMPLE_SHAPE = (62, 47)
SAMPLE_BYTES = 62 * 47 * 4
MB = 1024 * 1024


def _per_file(fmt: str) -> bool:
    from pipeline.data.storage import get_format
    from pipeline.data.storage.per_sample import PerSampleFormat

    return isinstance(get_format(fmt), PerSampleFormat)


def _run_one(out: Path, fmt: str, n: int, workers: int, extra: list[str]) -> dict:
    name = f"{fmt}-{n}"
    args = [
        "source=synthetic",
        f"source.num_samples={n}",
        f"storage={fmt}",
        "trainer.epochs=1",
        "model.hidden=[64]",
        "loader.batch_size=256",
        f"loader.num_workers={workers}",
        f"tracking.uri=sqlite:///{out}/mlflow.db",
        "tracking.experiment=bench_memory",
        f"tracking.run_name={name}",
        *extra,
    ]
    env = {**os.environ, "PIPELINE_ROOT": str(out), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_DIR.parent), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{res.stderr[-3000:]}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("bench_memory")
    (run,) = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'", order_by=["start_time DESC"]
    )[:1]
    m = run.data.metrics
    return {
        "format": fmt,
        "samples": n,
        "data_mb": round(n * SAMPLE_BYTES / MB, 1),
        "peak_used_mb": round(m["memory/peak_used_mb"], 1),
        "peak_mapped_file_mb": round(m["memory/peak_mapped_file_mb"], 1),
        "peak_rss_main_mb": round(m["memory/peak_rss_main_mb"], 1),
        "train_samples_per_s": round(m["perf/train_samples_per_s"]),
        "wall_s": round(secs, 1),
        "data_dir": run.data.tags.get("data.dir", ""),
    }


def scaling(out: Path, sizes: list[int], formats: list[str], per_file_max: int, workers: int, keep: bool):
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for fmt in formats:
        for n in sizes:
            if _per_file(fmt) and n > per_file_max:
                print(f"skip {fmt} at {n} samples (one file per sample; --per-file-max {per_file_max})")
                continue
            row = _run_one(out, fmt, n, workers, [])
            if not keep and row["data_dir"]:
                shutil.rmtree(row["data_dir"], ignore_errors=True)
            base = next(r for r in rows + [row] if r["format"] == fmt)
            row["used_vs_smallest"] = round(row["peak_used_mb"] / base["peak_used_mb"], 2)
            rows.append(row)
            print({k: v for k, v in row.items() if k != "data_dir"}, flush=True)
    fields = [k for k in rows[0] if k != "data_dir"]
    with open(out / "memory_scaling.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print()
    print("| " + " | ".join(fields) + " |")
    print("|" + "---|" * len(fields))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in fields) + " |")
    _plot(rows, out / "memory_scaling.png")
    print(f"\nwrote {out / 'memory_scaling.csv'} and {out / 'memory_scaling.png'}")
    return rows


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, fmt in enumerate(dict.fromkeys(r["format"] for r in rows)):
        rs = [r for r in rows if r["format"] == fmt]
        color = f"C{i}"
        ax.plot(
            [r["samples"] for r in rs],
            [r["peak_used_mb"] for r in rs],
            "o-",
            color=color,
            label=f"{fmt} used",
        )
        ax.plot(
            [r["samples"] for r in rs],
            [r["peak_mapped_file_mb"] for r in rs],
            "x--",
            color=color,
            alpha=0.6,
            label=f"{fmt} mapped file pages",
        )
    sizes = sorted({r["samples"] for r in rows})
    ax.plot(sizes, [n * SAMPLE_BYTES / MB for n in sizes], ":", color="gray", label="data size")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("samples (62x47 float32)")
    ax.set_ylabel("peak MB in one training epoch")
    ax.set_title("memory vs data size per storage format")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _system_used_mb(readings: int = 5) -> float:
    import psutil

    vals = []
    for _ in range(readings):
        vm = psutil.virtual_memory()
        vals.append((vm.total - vm.available) / MB)
        time.sleep(0.05)
    return statistics.median(vals)


def _summed_rss_mb() -> float:
    import psutil

    main = psutil.Process()
    return sum(p.memory_info().rss for p in [main, *main.children(recursive=True)]) / MB


def compare_free(out: Path, n: int, repeats: int) -> None:
    """Increase of memory/used_mb vs of MemTotal - MemAvailable, ram dataset + 2 forked workers."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from pipeline.config.schema import LoaderConfig
    from pipeline.data.export import export
    from pipeline.system.memory import snapshot
    from pipeline.training.loading import build_loader

    source = OmegaConf.create(
        {
            "name": "synthetic",
            "num_samples": n,
            "shape": list(SAMPLE_SHAPE),
            "num_classes": 10,
            "dtype": "float32",
            "seed": 0,
            "noise": 1.0,
            "block_size": 1024,
        }
    )
    exp = export(source, OmegaConf.create({"name": "ram"}), out / "data")
    loader_cfg = LoaderConfig(
        batch_size=256, num_workers=2, pin_memory="false", multiprocessing_context="fork"
    )
    print(f"ram dataset of {n} samples ({n * SAMPLE_BYTES / MB:.0f} MB), DataLoader with 2 forked workers")
    print("Δ = while iterating (mid-epoch) minus after the loader and data are released (1 s later)")
    print("| run | Δ system used (free) MB | Δ memory/used_mb | Δ summed RSS MB | used/free ratio |")
    print("|---|---|---|---|---|")
    for rep in range(repeats):
        ds = exp.dataset(np.arange(n))
        loader = build_loader(ds, loader_cfg, seed=rep, train=True, device=torch.device("cpu"))
        it = iter(loader)
        for i, _batch in enumerate(it):
            if i == len(loader) // 2:
                used1, rss1, sys1 = snapshot().used_mb, _summed_rss_mb(), _system_used_mb()
        del it, loader, ds, _batch
        gc.collect()  # no cycle keeps the array alive
        time.sleep(1.0)  # workers exit, the array is unmapped
        sys0, used0, rss0 = _system_used_mb(), snapshot().used_mb, _summed_rss_mb()
        d_sys, d_used, d_rss = sys1 - sys0, used1 - used0, rss1 - rss0
        print(f"| {rep + 1} | {d_sys:.0f} | {d_used:.0f} | {d_rss:.0f} | {d_used / d_sys:.2f} |", flush=True)


def main(argv=None) -> None:
    from pipeline.data.storage import formats

    FORMATS = formats()

    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    p.add_argument("--formats", nargs="+", default=sorted(FORMATS), help=f"default: all of {sorted(FORMATS)}")
    p.add_argument("--per-file-max", type=int, default=50_000, help="largest size for pt/npy")
    p.add_argument("--workers", type=int, default=0, help="loader.num_workers of each run")
    p.add_argument("--out", type=Path, default=Path("outputs/bench_memory"))
    p.add_argument("--keep-data", action="store_true")
    p.add_argument("--compare-free", action="store_true", help="memory/used_mb vs the system's used memory")
    p.add_argument("--samples", type=int, default=50_000, help="dataset size for --compare-free")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    for fmt in a.formats:
        if fmt not in FORMATS:
            p.error(f"--formats: unknown format {fmt!r}; registered: {sorted(FORMATS)}")
    out = a.out.resolve()
    if a.compare_free:
        compare_free(out, a.samples, a.repeats)
    else:
        scaling(out, sorted(a.sizes), a.formats, a.per_file_max, a.workers, a.keep_data)


if __name__ == "__main__":
    main()
