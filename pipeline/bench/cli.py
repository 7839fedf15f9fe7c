"""``python -m pipeline.bench [overrides]``: the loader bench as a Hydra app (conf/bench.yaml, schema in
pipeline/bench/schema.py), in an MLflow run. A multirun is one bench per point; each returns the best
samples/s of its ``bench.storages`` as the objective for Hydra sweepers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline import progress
from pipeline.bench import schema
from pipeline.bench.loader import run_bench
from pipeline.bench.report import format_table, label, plot, write_csv
from pipeline.config.resolvers import CONF_DIR
from pipeline.config.validate import ConfigError
from pipeline.tracking.lineage import git_info
from pipeline.tracking.store import TrackedRun, flatten, prepare_store
from pipeline.tracking.sweep import PARENT_ENV

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> list[dict]:
    schema.validate(cfg)
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
        rows = run_bench(cfg, tr)
        csv_path = write_csv(rows, output_dir / "results.csv")
        b = cfg.bench
        limit = f", {b.memory_limit_mb:g} MB cap" if b.memory_limit_mb is not None else ""
        title = f"{src.name} {shape} ({len(rows)} points): loader throughput, train split, {b.cache}{limit}"
        png = plot(rows, output_dir / "results.png", title)
        log.info("bench results (%s):\n%s", csv_path, format_table(rows))
        for r in rows:
            key = label(r).replace(" ", "_")
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


schema.register()  # conf/bench.yaml extends base_bench


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
