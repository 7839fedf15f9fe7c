"""One job: validate the config, then export -> partition -> load -> train, recorded in MLflow.

    from pipeline.job import run
    final_metrics = run(cfg)     # cfg composed by Hydra (cli.py) or by pipeline.api

Each stage is a plain function of the config (pipeline/stages.py, which the notebook API calls too); what
is recorded about each stage lives in pipeline/tracking/recorder.py.
"""

from __future__ import annotations

from contextlib import closing, nullcontext
from pathlib import Path

from omegaconf import DictConfig

from pipeline import progress, stages
from pipeline.config.validate import validate
from pipeline.runs.checkpoint import DIRNAME, CheckpointDir
from pipeline.runs.resume import open_resume, snapshot
from pipeline.tracking.recorder import JobRecorder
from pipeline.training import distributed
from pipeline.training.train import build_optimizer, fit, resolve_device
from pipeline.training.workers import worker_deaths_explained


def run(cfg: DictConfig) -> dict:
    validate(cfg)
    progress.configure(cfg.progress)
    resume = open_resume(cfg)  # a bad trainer.resume fails before any work
    device = distributed.init(resolve_device(cfg.trainer.device))  # torchrun: join the process group
    try:
        with JobRecorder(cfg, resume) as rec, worker_deaths_explained():
            return _stages(cfg, rec, resume, device)
    finally:
        distributed.shutdown()


def _stages(cfg: DictConfig, rec: JobRecorder, resume, device) -> dict:
    exp = distributed.rank0_first(lambda: stages.export_data(cfg))
    rec.export(exp)
    split = stages.split_data(cfg, exp)
    rec.split(exp, split)

    rec.threads(stages.prepare(cfg))
    rec.loading(device)
    train_loader, val_loader = stages.make_loaders(cfg, exp, split, device)
    with closing(train_loader), closing(val_loader):  # their worker processes end with the job
        return _train(cfg, rec, resume, device, exp, train_loader, val_loader)


def _train(cfg: DictConfig, rec: JobRecorder, resume, device, exp, train_loader, val_loader) -> dict:
    rec.loaders_built(train_loader)

    stats = stages.normalization(cfg, exp, train_loader.dataset)
    rec.transform(stats)
    model = stages.make_model(cfg, exp, stats).to(device)
    optimizer = build_optimizer(model, cfg.trainer)
    start = resume.restore(model, optimizer, train_loader, val_loader) if resume else 0
    history = resume.history if resume else []
    checkpoints = CheckpointDir(Path(cfg.paths.output_dir) / DIRNAME, cfg.trainer.keep_checkpoints)
    save = cfg.trainer.checkpoint and distributed.is_rank0()  # torchrun: rank 0 writes them

    def on_epoch(epoch: int, metrics: dict) -> None:
        rec.epoch(epoch, metrics)
        history.append(metrics)
        if save:
            state = snapshot(cfg, rec.run_id, model, optimizer, train_loader, val_loader, history)
            checkpoints.save(epoch + 1, state)

    with checkpoints if save else nullcontext():
        final = fit(
            model,
            train_loader,
            val_loader,
            cfg.trainer,
            device=device,
            memory=rec.memory,
            on_epoch=on_epoch,
            optimizer=optimizer,
            start_epoch=start,
            samples_seen=resume.samples_seen if resume else 0,
            sample_bytes=exp.stored_sample_bytes,
            files=exp.files,
        )
    rec.finished(model, val_loader, device, stages.model_spec(cfg, exp))
    return final
