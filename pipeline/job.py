"""One job: validate the config, then export -> partition -> load -> train, recorded in MLflow.

    from pipeline.job import run
    final_metrics = run(cfg)     # cfg composed by Hydra (cli.py) or by pipeline.api

Each stage is a plain function of its config subtree; what is recorded about each stage lives in
pipeline/tracking/recorder.py.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from omegaconf import DictConfig

from pipeline import progress
from pipeline.config.validate import check_sizes, validate
from pipeline.data.export import export
from pipeline.data.partition import partition
from pipeline.data.storage import get_format
from pipeline.runs.checkpoint import DIRNAME, CheckpointDir
from pipeline.runs.resume import open_resume, snapshot
from pipeline.tracking.recorder import JobRecorder
from pipeline.training import distributed
from pipeline.training.loading import build_loader
from pipeline.training.models import build_model
from pipeline.training.seeding import seed_everything
from pipeline.training.threads import apply_torch_threads
from pipeline.training.train import build_optimizer, fit, resolve_device
from pipeline.training.transforms import FlipCrop, train_stats
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
    exp = distributed.rank0_first(
        lambda: export(cfg.source, cfg.storage, cfg.paths.data_dir, verify=cfg.verify)
    )
    rec.export(exp)
    check_sizes(cfg, len(exp.labels))  # sources that learn their size only by exporting (lfw)
    split = partition(exp.labels, cfg.split)
    check_fits = getattr(get_format(cfg.storage.name), "check_fits", None)  # formats that load into memory
    if check_fits is not None:  # fail here, naming the sizes, rather than in the kernel's OOM killer
        check_fits(exp.spec, len(split.train) + len(split.val))
    rec.split(exp, split)

    rec.threads(apply_torch_threads(cfg.trainer.torch_threads))
    rec.loading(device)
    seed = cfg.trainer.seed
    seed_everything(seed, cfg.trainer.deterministic)
    train_set = exp.dataset(split.train, cfg.storage)
    train_loader = build_loader(
        train_set,
        cfg.loader,
        seed=seed,
        train=True,
        device=device,
        augment=FlipCrop.from_config(cfg.transform),
    )
    val_loader = build_loader(
        exp.dataset(split.val, cfg.storage), cfg.loader, seed=seed, train=False, device=device
    )
    rec.loaders_built()

    stats = train_stats(train_set, exp.spec) if cfg.transform.normalize else None
    rec.transform(stats)
    model = build_model(cfg.model, exp.spec, stats).to(device)
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
        )
    rec.finished(model, val_loader, device, exp.spec)
    return final
