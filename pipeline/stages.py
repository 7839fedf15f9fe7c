"""The stages of a job, each a plain function of the config: the ``pipeline`` command (pipeline/job.py) and
the notebook API (pipeline/api.py) call these same functions, so one config gives one run either way.

    exp = export_data(cfg)                        # export (or reuse) the samples in the storage format
    split = split_data(cfg, exp)                  # seeded train / val ids, sizes checked
    train_loader, val_loader = make_loaders(cfg, exp, split, device)   # threads and seeds set first
    model = make_model(cfg, exp, train_loader.dataset)                 # transform.normalize: train figures
    optimizer = build_optimizer(model, cfg.trainer)
    final = fit(model, train_loader, val_loader, cfg.trainer, device=device, ...)   # pipeline.training.train

The job adds what is recorded about each stage (pipeline/tracking/recorder.py), torchrun's coordination
(rank 0 exports first) and checkpoints; nothing here logs to MLflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig

from pipeline.config.validate import check_sizes
from pipeline.data.export import Export, export
from pipeline.data.partition import Split, partition
from pipeline.data.storage import get_format

if TYPE_CHECKING:  # torch is imported by the stages that train, not by the export (pipeline-export)
    import torch


def export_data(cfg: DictConfig) -> Export:
    """Export (or reuse) the source's samples in the configured storage format, its work where ``export``
    says (workers, engine). Sources that learn their size only by exporting (lfw, image folders) have their
    split and batch sizes checked now. With ``paths.data_dir=s3://...`` the export is built locally,
    published to the bucket and read through a local cache (pipeline/data/remote/exporting.py)."""
    from pipeline.data.remote.urls import parse_location

    if parse_location(cfg.paths.data_dir).is_remote:
        from pipeline.data.remote.exporting import export_to_bucket

        exp = export_to_bucket(
            cfg.source, cfg.storage, cfg.paths.data_dir, cfg.paths.cache_dir, cfg.verify, cfg.get("export")
        )
    else:
        exp = export(
            cfg.source, cfg.storage, cfg.paths.data_dir, verify=cfg.verify, export_cfg=cfg.get("export")
        )
    check_sizes(cfg, len(exp.labels))
    return exp


def split_data(cfg: DictConfig, exp: Export) -> Split:
    """The seeded split; a format that holds its data in memory fails now, naming the sizes, rather than
    in the kernel's OOM killer."""
    split = partition(exp.labels, cfg.split)
    get_format(cfg.storage.name).check_fits(exp.spec, len(split.train) + len(split.val))
    return split


def prepare(cfg: DictConfig) -> int:
    """Torch's intra-op threads (``trainer.torch_threads``) and every seed (``trainer.seed``, deterministic
    kernels): what the numbers of a run depend on besides the data. Returns the thread count in effect."""
    from pipeline.training.seeding import seed_everything
    from pipeline.training.threads import apply_torch_threads

    threads = apply_torch_threads(cfg.trainer.torch_threads)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    return threads


def make_loaders(cfg: DictConfig, exp: Export, split: Split, device: torch.device):
    """(train_loader, val_loader) over the export's split; each sample transformed (``transform``: train
    augmentation, resizing) where its batch is read. ``loader.num_workers=auto`` / ``decode_threads=auto``
    are resolved first (pipeline/tune/auto.py); ``train_loader.resolved`` says to what, for the job to log."""
    from pipeline.training.loading import build_loader
    from pipeline.training.transforms import from_config
    from pipeline.tune.auto import resolve

    loader_cfg, resolved = resolve(cfg, exp, device)
    seed = cfg.trainer.seed
    train_tf, val_tf = from_config(cfg.transform, exp.spec.shape)
    train = build_loader(
        exp.dataset(split.train, cfg.storage),
        loader_cfg,
        seed=seed,
        train=True,
        device=device,
        transform=train_tf,
    )
    val = build_loader(
        exp.dataset(split.val, cfg.storage),
        loader_cfg,
        seed=seed,
        train=False,
        device=device,
        transform=val_tf,
    )
    train.resolved = resolved
    return train, val


def normalization(cfg: DictConfig, exp: Export, train_set):
    """``transform.normalize``: the train split's per-channel mean and std; None otherwise."""
    from pipeline.training.transforms import train_stats

    return train_stats(train_set, exp.spec) if cfg.transform.normalize else None


def model_spec(cfg: DictConfig, exp: Export):
    """The export's sample spec with the shape the model sees (``transform.size`` resizes)."""
    import dataclasses

    from pipeline.training.transforms import from_config

    train_tf, _ = from_config(cfg.transform, exp.spec.shape)
    shape = train_tf.output_shape(exp.spec.shape) if train_tf is not None else exp.spec.shape
    return dataclasses.replace(exp.spec, shape=tuple(shape))


def make_model(cfg: DictConfig, exp: Export, stats=None) -> torch.nn.Module:
    from pipeline.training.models import build_model

    return build_model(cfg.model, model_spec(cfg, exp), stats)
