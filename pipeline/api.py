"""Python API for notebooks: compose a config with Hydra's compose API, then run the stages one by one.

    from pipeline import api
    cfg = api.compose_config(["source=digits", "trainer.epochs=3"])   # same overrides as the CLI
    exp = api.export_data(cfg)                       # exp.root, exp.spec, exp.labels, exp.dataset(ids)
    split = api.split_data(cfg, exp)                 # split.train, split.val (sample ids)
    train_loader, val_loader = api.make_loaders(cfg, exp, split)   # train batches augmented (transform)
    model = api.make_model(cfg, exp, train_loader)   # train_loader: for transform.normalize's figures
    history = api.train(cfg, model, train_loader, val_loader)   # one metrics dict per epoch
    fig_paths = api.plot(cfg, exp, model, val_loader, history)  # PNGs in cfg.paths.output_dir/plots

    final = api.run(cfg)                             # or the whole job, tracked in MLflow like the CLI

The stages above are pipeline/stages.py's, the very functions the CLI's job runs, so a notebook gives
the CLI's numbers for the same config; they are not tracked (nothing is logged to MLflow). ``run`` is
exactly the CLI's job.
Outside ``@hydra.main`` there is no ``${hydra:runtime.output_dir}``, so ``compose_config`` sets
``paths.output_dir`` to ``<paths.outputs>/notebook/<date>/<time>`` unless you pass it, and writes
the composed config to ``<output_dir>/.hydra/config.yaml`` (the run logs it as an artifact).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import pipeline.config
from pipeline.config.resolvers import CONF_DIR
from pipeline.config.validate import validate


def compose_config(overrides: Sequence[str] = (), output_dir: str | Path | None = None) -> DictConfig:
    """The config the CLI would run with these overrides, validated, with a concrete ``paths.output_dir``."""
    overrides = list(overrides)
    if output_dir is not None:
        overrides.append(f"paths.output_dir={Path(output_dir).resolve()}")
    elif not any(o.startswith("paths.output_dir=") for o in overrides):
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S") + f"-{time.time_ns() % 1_000_000:06d}"
        overrides.append(f"paths.output_dir=${{paths.outputs}}/notebook/{stamp}")
    pipeline.config.register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="notebook"):
        cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    out = Path(cfg.paths.output_dir)
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml", resolve=True)
    return cfg


def export_data(cfg: DictConfig):
    """Export (or reuse) the source's samples in the configured storage format; returns an ``Export``."""
    from pipeline import stages

    return stages.export_data(cfg)


def split_data(cfg: DictConfig, exp):
    from pipeline import stages

    return stages.split_data(cfg, exp)


def device(cfg: DictConfig) -> torch.device:
    from pipeline.training.train import resolve_device

    return resolve_device(cfg.trainer.device)


def make_loaders(cfg: DictConfig, exp, split):
    """(train_loader, val_loader) over the export, as the job builds them: torch threads and every seed
    are set first, as the job sets them."""
    from pipeline import stages

    stages.prepare(cfg)
    return stages.make_loaders(cfg, exp, split, device(cfg))


def make_model(cfg: DictConfig, exp, train_loader=None):
    """The model, as the job builds it; with ``transform.normalize`` it normalises with the train split's
    figures (pass ``train_loader``). Call it after ``make_loaders``, as the job does: the seeds are set
    there."""
    from pipeline import stages

    stats = None
    if cfg.transform.normalize:
        if train_loader is None:
            raise ValueError(
                "transform.normalize=true: pass the train loader, make_model(cfg, exp, train_loader)"
            )
        stats = stages.normalization(cfg, exp, train_loader.dataset)
    return stages.make_model(cfg, exp, stats)


def train(cfg: DictConfig, model, train_loader, val_loader) -> list[dict]:
    """Train ``model`` in place for ``cfg.trainer.epochs``; returns one metrics dict per epoch."""
    from pipeline import progress
    from pipeline.training.train import build_optimizer, fit

    progress.configure(cfg.get("progress", "auto"))
    history: list[dict] = []
    dev = device(cfg)
    model.to(dev)
    fit(
        model,
        train_loader,
        val_loader,
        cfg.trainer,
        device=dev,
        on_epoch=lambda epoch, metrics: history.append(dict(metrics)),
        optimizer=build_optimizer(model, cfg.trainer),
    )
    return history


def plot(cfg: DictConfig, exp, model, val_loader, history: list[dict]) -> list[Path]:
    """The run's plots from an untracked session: samples, loss, accuracy, confusion matrix."""
    from pipeline.tracking import plots

    out = Path(cfg.paths.output_dir) / "plots"

    def series(*keys):
        return {k: [(e, h[k]) for e, h in enumerate(history)] for k in keys}

    y_true, y_pred = plots.predict(model, val_loader, device(cfg))
    return [
        plots.sample_grid(exp, out / "samples.png"),
        plots.curves(series("train/loss", "val/loss"), "loss", out / "loss.png"),
        plots.curves(series("train/accuracy", "val/accuracy"), "accuracy", out / "accuracy.png"),
        plots.confusion(y_true, y_pred, list(exp.spec.class_names), out / "confusion_matrix.png"),
    ]


def run(cfg: DictConfig) -> dict:
    """The whole job, tracked in MLflow exactly like the ``pipeline`` command; returns final metrics."""
    from pipeline.job import run as run_job

    return run_job(cfg)
