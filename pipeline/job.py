"""One job: validate the config, then export -> partition -> load -> train, all tracked in MLflow.

    from pipeline.job import run
    final_metrics = run(cfg)     # cfg composed by Hydra (cli.py) or by pipeline.api

Each stage is a plain function of its config subtree; this module only wires them together and
records what they did.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

from omegaconf import DictConfig

from pipeline import distributed, plots, progress
from pipeline.checkpoint import DIRNAME, CheckpointDir
from pipeline.config import ConfigError, validate
from pipeline.export import MANIFEST, export
from pipeline.lineage import lineage_tags
from pipeline.loading import build_loader, worker_deaths_explained
from pipeline.logged_model import log_final_model
from pipeline.memory import MemorySampler
from pipeline.memory_record import log_final, log_series
from pipeline.models import build_model
from pipeline.partition import partition, save_split
from pipeline.resume import open_resume, snapshot
from pipeline.seeding import seed_everything
from pipeline.threads import apply_torch_threads
from pipeline.tracking import TrackedRun, flatten, prepare_store, sweep_parent_run_id
from pipeline.train import build_optimizer, expected_samples, fit, resolve_device

log = logging.getLogger(__name__)


def _hydra_overrides() -> str:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    return " ".join(HydraConfig.get().overrides.task)


def _run_name(cfg: DictConfig) -> str:
    return cfg.tracking.run_name or f"{cfg.source.name}-{cfg.storage.name}-{cfg.model.name}"


def run(cfg: DictConfig) -> dict:
    validate(cfg)
    progress.configure(cfg.get("progress", "auto"))
    output_dir = Path(cfg.paths.output_dir)
    uri = cfg.tracking.uri
    resume = open_resume(cfg)  # a bad trainer.resume fails before any work
    device = distributed.init(resolve_device(cfg.trainer.device))  # torchrun: join the process group
    try:
        return _tracked(cfg, output_dir, uri, device, resume)
    finally:
        distributed.shutdown()


def _tracked(cfg: DictConfig, output_dir: Path, uri: str, device, resume) -> dict:
    if not distributed.is_rank0():  # one MLflow run per training: rank 0's
        with distributed.NoRun() as tr:
            memory = MemorySampler(cfg.trainer.memory_interval_s, cfg.trainer.memory_budget_mb)
            try:
                with worker_deaths_explained():
                    return _stages(cfg, tr, distributed.rank_dir(output_dir), memory, resume, device)
            finally:
                memory.stop()
    experiment_id = prepare_store(uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
    tags = {
        "pipeline.role": "job",
        "hydra.overrides": _hydra_overrides(),
        **lineage_tags(cfg),
    }
    with TrackedRun(uri, experiment_id, _run_name(cfg), sweep_parent_run_id(), tags) as tr:
        log.info("MLflow: run %s in %s", tr.run_id, uri)
        if resume is not None:
            resume.link(tr)
        tr.log_params(flatten(cfg))
        tr.log_artifact(output_dir / ".hydra", "hydra")
        memory = MemorySampler(cfg.trainer.memory_interval_s, cfg.trainer.memory_budget_mb)
        try:
            with worker_deaths_explained():
                return _stages(cfg, tr, output_dir, memory, resume, device)
        finally:
            log_final(tr, memory.stop(), output_dir, cfg.trainer.epochs - 1, cfg.trainer.memory_budget_mb)
            for handler in logging.getLogger().handlers:  # the job's log file complete before upload
                handler.flush()
            for logfile in output_dir.glob("*.log"):
                tr.log_artifact(logfile)


def _stages(
    cfg: DictConfig, tr: TrackedRun, output_dir: Path, memory: MemorySampler, resume=None, device=None
) -> dict:
    exp = distributed.rank0_first(
        lambda: export(cfg.source, cfg.storage, cfg.paths.data_dir, verify=cfg.verify)
    )
    tr.set_tags(
        {
            "data.fingerprint": exp.fingerprint,
            "data.dir": str(exp.root),
            "data.reused": str(exp.reused).lower(),
            "data.content_sha256": exp.manifest["content_sha256"],
        }
    )
    tr.log_artifact(exp.root / MANIFEST, "data")

    split = partition(exp.labels, cfg.split)
    tr.log_artifact(save_split(split, output_dir / "split.npz"))
    tr.log_artifact(plots.sample_grid(exp, output_dir / "plots" / "samples.png"), "plots")
    tr.set_tags({"split.digest": split.digest, "split.stratified": str(split.stratified).lower()})
    tr.log_params(
        {
            "data.num_samples": len(exp.labels),
            "data.num_train": len(split.train),
            "data.num_val": len(split.val),
        }
    )
    if cfg.loader.drop_last and cfg.loader.batch_size > len(split.train):
        raise ConfigError(
            "loader.batch_size",
            cfg.loader.batch_size,
            f"with drop_last=true it must be <= the {len(split.train)} train samples",
        )

    tr.log_params({"torch.num_threads": apply_torch_threads(cfg.trainer.torch_threads)})
    memory.start(device)  # before the datasets are built: storage=ram loads its data there
    seed = cfg.trainer.seed
    seed_everything(seed, cfg.trainer.deterministic)
    train_loader = build_loader(
        exp.dataset(split.train, cfg.storage), cfg.loader, seed=seed, train=True, device=device
    )
    val_loader = build_loader(
        exp.dataset(split.val, cfg.storage), cfg.loader, seed=seed, train=False, device=device
    )
    memory.sample()
    memory.check("after building the datasets")
    model = build_model(cfg.model, exp.spec).to(device)
    optimizer = build_optimizer(model, cfg.trainer)
    start = resume.restore(model, optimizer, train_loader, val_loader) if resume else 0
    history = resume.history if resume else []
    log.info(
        "train: %d train / %d val samples, %s on %s",
        len(split.train),
        len(split.val),
        cfg.model.name,
        device,
    )
    checkpoints = CheckpointDir(output_dir / DIRNAME, cfg.trainer.keep_checkpoints)

    def on_epoch(epoch: int, metrics: dict) -> None:
        tr.log_metrics(metrics, step=epoch)
        log_series(tr, memory)
        history.append(metrics)
        if cfg.trainer.checkpoint and distributed.is_rank0():  # torchrun: rank 0 writes them
            state = snapshot(cfg, tr.run_id, model, optimizer, train_loader, val_loader, history)
            checkpoints.save(epoch + 1, state)

    with checkpoints if cfg.trainer.checkpoint else nullcontext():
        final = fit(
            model,
            train_loader,
            val_loader,
            cfg.trainer,
            device=device,
            memory=memory,
            on_epoch=on_epoch,
            optimizer=optimizer,
            start_epoch=start,
        )
    final["train/samples_seen"] += expected_samples(
        len(split.train), cfg.loader.batch_size, cfg.loader.drop_last, start
    )
    tr.log_metrics({"train/samples_seen": final["train/samples_seen"]}, step=cfg.trainer.epochs - 1)
    distributed.record_params(model, cfg.paths.output_dir, tr)
    if not distributed.is_rank0():
        return final
    plots.log_training_plots(tr, model, val_loader, device, exp.spec.class_names, output_dir / "plots")
    if cfg.tracking.log_model:
        log_final_model(tr, model, cfg.model, exp.spec)
    return final
