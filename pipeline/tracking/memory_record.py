"""Record a MemorySampler in an MLflow run: time series, peaks, a CSV and the timeline plot.

    from pipeline.tracking.memory_record import log_series, log_final
    log_series(tracked_run, sampler)        # at each epoch end: new samples in a few log_batch calls
    log_final(tracked_run, sampler, output_dir, step=last_epoch, budget_mb=None)

Series ``memory/<figure>`` (step = sample index, the sample's own timestamp) for every figure of
``pipeline.system.memory.Snapshot``, logged in batches (each MLflow call is a round trip to the store);
at the end ``memory/peak_<figure>``, ``memory/min_system_available_mb`` and the artifacts
``memory/memory_timeline.{png,csv}``.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import asdict
from pathlib import Path

from pipeline.system.memory import MB, MemorySampler
from pipeline.tracking.memory_plot import plot_timeline

log = logging.getLogger(__name__)
MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch call


def log_series(tr, sampler: MemorySampler) -> int:
    """Log the samples taken since the last call; return how many."""
    from mlflow.entities import Metric

    rows = sampler.drain()
    items = [
        Metric(f"memory/{key}", value, int(s.t * 1000), index)
        for index, s in rows
        for key, value in s.metrics().items()
    ]
    for i in range(0, len(items), MLFLOW_BATCH):
        tr.client.log_batch(tr.run_id, metrics=items[i : i + MLFLOW_BATCH])
    return len(rows)


def write_csv(samples, path: Path) -> Path:
    fields = list(asdict(samples[0]))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for s in samples:
            writer.writerow(asdict(s))
    return path


def log_final(tr, sampler: MemorySampler, output_dir, step: int = 0, budget_mb: float | None = None) -> dict:
    """Remaining series, peaks, CSV and PNG timeline; returns the peak metrics logged.

    Never raises (it also runs while a failed run unwinds): a problem is logged instead.
    """
    try:
        return _log_final(tr, sampler, output_dir, step, budget_mb)
    except Exception:
        log.exception("memory: could not record the memory figures in MLflow")
        return {}


def _log_final(tr, sampler: MemorySampler, output_dir, step: int, budget_mb: float | None) -> dict:
    if not sampler.samples:
        return {}
    log_series(tr, sampler)
    peaks = {f"memory/peak_{k}": v for k, v in sampler.peak.items() if k != "min_system_available_mb"}
    if "min_system_available_mb" in sampler.peak:
        peaks["memory/min_system_available_mb"] = sampler.peak["min_system_available_mb"]
    if sampler.device is not None and getattr(sampler.device, "type", "") == "cuda":
        import torch

        peaks["memory/peak_cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(sampler.device) / MB
    tr.log_metrics(peaks, step=step)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    png = plot_timeline(
        sampler.samples,
        sampler.epoch_marks,
        folder / "memory_timeline.png",
        budget_mb=budget_mb,
        title=f"memory timeline ({len(sampler.samples)} samples every {sampler.interval_s:g} s)",
    )
    tr.log_artifact(png, "memory")
    tr.log_artifact(write_csv(sampler.samples, folder / "memory_timeline.csv"), "memory")
    log.info(
        "memory: peak used %.0f MB (main %.0f, workers %.0f), peak mapped file pages %.0f MB",
        sampler.peak.get("used_mb", 0),
        sampler.peak.get("used_main_mb", 0),
        sampler.peak.get("used_workers_mb", 0),
        sampler.peak.get("mapped_file_mb", 0),
    )
    return peaks
