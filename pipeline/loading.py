"""Load stage: DataLoaders over the exported train and val ids, built from the ``loader`` config.

    from pipeline.loading import build_loader
    train_loader = build_loader(train_ds, cfg.loader, seed=cfg.trainer.seed, train=True, device=dev)

Shuffling uses ``seeding.EpochShuffle``: epoch e's order is a function of (trainer seed, e) only,
whatever ``num_workers``/``persistent_workers`` are. Worker seeds come from a ``torch.Generator``
seeded from the trainer seed, and each worker seeds numpy and ``random`` from its torch seed.
``prefetch_factor`` and ``persistent_workers`` are passed only with workers (DataLoader rejects
them otherwise); ``pin_memory=auto`` pins only when training on CUDA; ``multiprocessing_context=auto``
forks where the platform can (launchers such as joblib change the default start method to one
DataLoader workers cannot use). ``worker_failure(err)`` turns torch's "DataLoader worker ...
killed" error into one that says what happened and what to do.
"""

from __future__ import annotations

import multiprocessing as mp
import random

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.seeding import EpochShuffle


def seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _pin_memory(setting, device: torch.device) -> bool:
    setting = str(setting).lower()
    if setting == "auto":
        return device.type == "cuda"
    return setting == "true"


def _mp_context(setting: str):
    if setting == "auto":
        return "fork" if "fork" in mp.get_all_start_methods() else None
    return setting


def build_loader(dataset, cfg, *, seed: int, train: bool, device: torch.device) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(int(seed) + (0 if train else 1))
    kwargs = dict(
        batch_size=cfg.batch_size,
        sampler=EpochShuffle(len(dataset), seed) if train and cfg.shuffle else None,
        drop_last=bool(cfg.drop_last) if train else False,
        num_workers=cfg.num_workers,
        pin_memory=_pin_memory(cfg.pin_memory, device),
        worker_init_fn=seed_worker,
        generator=generator,
    )
    if cfg.num_workers > 0:
        kwargs.update(
            prefetch_factor=cfg.prefetch_factor,
            persistent_workers=bool(cfg.persistent_workers),
            multiprocessing_context=_mp_context(cfg.multiprocessing_context),
        )
    return DataLoader(dataset, **kwargs)


class WorkerDied(RuntimeError):
    """A DataLoader worker process died mid-epoch (killed, or out of memory): the run stops."""


def worker_failure(err: BaseException) -> WorkerDied | None:
    """A clear error for a dead DataLoader worker, or None when ``err`` is something else."""
    text = str(err)
    if not isinstance(err, RuntimeError) or "DataLoader worker" not in text:
        return None
    return WorkerDied(
        f"{text.strip()} -- a DataLoader worker process died mid-epoch, so the run stopped rather than "
        "train on an incomplete epoch. A worker killed by signal 9 (Killed) is usually the kernel's OOM "
        "killer (see `dmesg`): lower loader.num_workers, loader.batch_size or loader.prefetch_factor"
    )
