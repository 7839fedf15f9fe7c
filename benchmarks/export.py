"""Export throughput: the serial path, all cores (``export.workers=auto``), and a local Dask cluster, on one
image folder, each run building its export from scratch into its own folder; beside them the disk's write
bandwidth, measured in the same run.

    python -m benchmarks.export                                   # 4,000 160x160 RGB photo crops -> jpeg q90
    python -m benchmarks.export --num-samples 20000 --repeats 3
    python -m benchmarks.export --storage storage=shards storage.dtype=uint8
    PYTHONPATH=/path/to/ray python -m benchmarks.export --ray     # also Ray, where it is importable

The folder (``--root``, default under /tmp) is made with benchmarks/photos.py when missing (PNGs of real photo
crops); it is read once before timing, so every run reads it from the page cache. Runs are interleaved
(serial, all cores, dask, serial, ...) so a change of the machine's load hits all of them alike, and the load
average is printed beside each. Each run's figures are the export's own (the manifest's ``throughput``:
samples / the build's seconds, bytes written / the build's seconds); every run must give the same
``content_sha256``, or the script fails. The engines' start-up (Dask ``LocalCluster``, Ray ``init``) is timed
apart, and counted in their runs' seconds too.

``--ray`` runs the same pieces through Ray tasks (an engine defined here, not part of the pipeline: Dask was
chosen, pipeline/data/engines/), to compare start-up and throughput; Ray is not a dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

DEFAULT_ROOT = Path(tempfile.gettempdir()) / "export-bench"
STORAGE = ["storage=encoded", "storage.codec=jpeg", "storage.quality=90"]


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def disk_write_mb_s(folder: Path, mb: int = 256) -> float:
    """Sequential write bandwidth of ``folder``'s file system: ``mb`` MB in 4 MiB writes, then fsync."""
    path = folder / "bandwidth.probe"
    block = os.urandom(4 << 20)
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        for _ in range(mb * 10**6 // len(block) + 1):
            fh.write(block)
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t
    size = path.stat().st_size
    path.unlink()
    return size / 1e6 / seconds


def photo_folder(root: Path, n: int, size: tuple[int, int]) -> Path:
    folder = root / f"photos-{n}-{size[0]}x{size[1]}"
    if not (folder / ".complete").exists():
        from benchmarks.photos import write_image_folder

        shutil.rmtree(folder, ignore_errors=True)
        print(f"writing {n} photo crops of {size[0]}x{size[1]} to {folder} ...", flush=True)
        write_image_folder(folder, n, size, "RGB")
        (folder / ".complete").write_text("")
    for path in folder.rglob("*.png"):  # into the page cache: every run reads it warm
        path.read_bytes()
    return folder


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import pipeline.config
    from pipeline.config.resolvers import CONF_DIR

    pipeline.config.register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def run_export(cfg, data_dir: Path, engine: str, workers) -> dict:
    from pipeline.data.export import export

    shutil.rmtree(data_dir, ignore_errors=True)
    ecfg = OmegaConf.create({"workers": workers, "engine": engine, "address": None, "tasks_per_worker": 4})
    before = load()
    t = time.perf_counter()
    exp = export(cfg.source, cfg.storage, data_dir, export_cfg=ecfg)
    wall = time.perf_counter() - t
    out = dict(exp.throughput, wall_s=wall, content=exp.manifest["content_sha256"], load=before)
    out["bytes"] = exp.manifest["files"]["bytes"]
    shutil.rmtree(data_dir, ignore_errors=True)
    return out


def dask_startup(workers: int) -> tuple[float, float]:
    from pipeline.data.engines.dask_cluster import DaskEngine

    t = time.perf_counter()
    engine = DaskEngine(workers)
    started = time.perf_counter() - t
    t = time.perf_counter()
    engine.close()
    return started, time.perf_counter() - t


def ray_run(cfg, data_dir: Path, workers: int) -> dict:
    """The export's pieces as Ray tasks (the pipeline's write loop, a Ray engine defined here)."""
    import ray

    from pipeline.data.engines import Engine
    from pipeline.data.sources import get_source
    from pipeline.data.storage import get_format
    from pipeline.data.writing import write_samples

    class RayEngine(Engine):
        name, in_process = "ray", False

        def __init__(self, n: int) -> None:
            ray.init(num_cpus=n, include_dashboard=False, logging_level="ERROR")
            self.workers, self.in_flight = n, 4 * n
            self.remote = ray.remote(lambda fn, shared, item: fn(shared, item))

        def prepare(self, shared):
            return ray.put(shared)

        def submit(self, fn, shared, item):
            return self.remote.remote(fn, shared, item)

        def result(self, handle):
            return ray.get(handle)

        def close(self) -> None:
            ray.shutdown()

    shutil.rmtree(data_dir, ignore_errors=True)
    before = load()
    t = time.perf_counter()
    engine = RayEngine(workers)
    started = time.perf_counter() - t
    try:
        kind = get_source(cfg.source.name)
        source = kind.build_parallel(cfg.source, engine.pmap, engine.workers)
        tmp = data_dir / "tmp"
        tmp.mkdir(parents=True)
        writer = get_format(cfg.storage.name).writer(tmp, source.spec, cfg.storage)
        written = write_samples(engine, kind, cfg.source, source, source.spec, 255.0, writer, tmp)
    finally:
        t_close = time.perf_counter()
        engine.close()
        closed = time.perf_counter() - t_close
    wall = time.perf_counter() - t
    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "workers": workers,
        "engine": "ray",
        "samples_per_s": written.done / wall,
        "mb_per_s": size / 1e6 / wall,
        "wall_s": wall,
        "content": written.content_sha256,
        "load": before,
        "startup_s": started,
        "close_s": closed,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where the photo folder and exports go")
    ap.add_argument("--num-samples", type=int, default=4000)
    ap.add_argument("--size", type=int, nargs=2, default=[160, 160], metavar=("H", "W"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-dask", action="store_true")
    ap.add_argument("--ray", action="store_true", help="also Ray tasks (Ray must be importable)")
    ap.add_argument("--storage", nargs="*", default=STORAGE, help="storage overrides (default: jpeg q90)")
    ap.add_argument("--json", type=Path, help="write every run's figures here")
    a = ap.parse_args(argv)

    from pipeline.system.cpus import cpu_quota, usable_cpus

    a.root.mkdir(parents=True, exist_ok=True)
    folder = photo_folder(a.root, a.num_samples, tuple(a.size))
    cfg = compose(
        [
            "source=image_folder",
            f"source.root={folder}",
            f"source.size=[{a.size[0]},{a.size[1]}]",
            "source.mode=RGB",
            "progress=false",
            *a.storage,
        ]
    )
    cores = usable_cpus()
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: {os.cpu_count()} CPUs, usable {cores} "
        f"(quota {cpu_quota()}), Python {platform.python_version()}"
    )
    print(f"# {a.num_samples} RGB {a.size[0]}x{a.size[1]} PNGs in {folder} (warm), {' '.join(a.storage)}")
    disk = disk_write_mb_s(a.root)
    print(f"# disk: {disk:.0f} MB/s sequential write + fsync into {a.root} (256 MB)")
    if not a.no_dask:
        started, closed = dask_startup(cores)
        print(f"# dask LocalCluster of {cores} workers: start {started:.2f} s, close {closed:.2f} s")
    plan = [("serial", "local", 1), ("all cores", "local", "auto")]
    if not a.no_dask:
        plan.append(("dask local cluster", "dask", "auto"))
    runs: list[dict] = []
    for r in range(a.repeats):
        for label, engine, workers in plan:
            out = run_export(cfg, a.root / "data", engine, workers)
            out.update(label=label, repeat=r)
            runs.append(out)
            print(
                f"{label:>20} run {r}: {out['samples_per_s']:7.0f} samples/s {out['mb_per_s']:6.1f} MB/s "
                f"{out['wall_s']:6.2f} s  workers {out['workers']}  load before {out['load']}",
                flush=True,
            )
        if a.ray:
            out = ray_run(cfg, a.root / "data", cores)
            out.update(label="ray tasks", repeat=r)
            runs.append(out)
            print(
                f"{'ray tasks':>20} run {r}: {out['samples_per_s']:7.0f} samples/s "
                f"{out['mb_per_s']:6.1f} MB/s "
                f"{out['wall_s']:6.2f} s  (init {out['startup_s']:.2f} s, shutdown {out['close_s']:.2f} s) "
                f"load before {out['load']}",
                flush=True,
            )
    contents = {r["content"] for r in runs}
    if len(contents) != 1:
        raise SystemExit(f"the runs exported different content: {contents}")
    best = {}
    for r in runs:
        best[r["label"]] = max(best.get(r["label"], 0.0), r["samples_per_s"])
    serial = best["serial"]
    print(f"\n| run | best samples/s | x serial | MB/s written | vs disk write ({disk:.0f} MB/s) |")
    print("|---|---|---|---|---|")
    for label, rate in best.items():
        mb = max(r["mb_per_s"] for r in runs if r["label"] == label)
        print(f"| {label} | {rate:,.0f} | {rate / serial:.2f}x | {mb:.1f} | {100 * mb / disk:.1f}% |")
    print(f"\nsame content_sha256 in all {len(runs)} runs: {contents.pop()[:16]}...; load now {load()}")
    if a.json:
        a.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
