"""Load stage: loaders over the exported train and val ids, built from the ``loader`` config.

    from pipeline.training.loading import build_loader
    train_loader = build_loader(train_ds, cfg.loader, seed=cfg.trainer.seed, train=True, device=dev)
    for x, y in train_loader: ...              # one epoch per pass
    train_loader.set_epoch(3)                  # the next pass is epoch 3's (resume)
    train_loader.batch_size, train_loader.drop_last, train_loader.num_samples   # this rank's, per epoch

``build_loader`` returns an ``EpochLoader``: a DataLoader over the dataset's own batches plus what an epoch
needs around it. A storage format's dataset (``BatchedDataset``, pipeline/data/storage/base.py) gives its
batch sampler (pipeline/data/sampling.py) and reads whole batches; any other map-style Dataset is read item
by item in ``EpochShuffle``'s order. Either way epoch e's batches are a function of (trainer seed, e) only,
whatever ``num_workers``/``persistent_workers``/``thread_prefetch`` are; under torchrun each rank takes its
share (``for_rank``). Worker seeds come from a ``torch.Generator`` seeded from the trainer seed, and each
worker seeds numpy and ``random`` from its torch seed. ``prefetch_factor`` and ``persistent_workers`` are
passed only with workers (DataLoader rejects them otherwise); ``pin_memory=auto`` pins only when training
on CUDA; ``multiprocessing_context=auto`` forks where the platform can (launchers such as joblib change the
default start method to one DataLoader workers cannot use). A worker that dies:
pipeline/training/workers.py.

``augment`` (train loaders only; pipeline.training.transforms) transforms each batch in this process,
seeded per (seed, epoch, batch, rank). ``loader.thread_prefetch > 0`` runs the loader in a background
thread that prepares that many batches ahead, augmentation included (pipeline.training.prefetch).
"""

from __future__ import annotations

import multiprocessing as mp
import random

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.data.sampling import EpochShuffle
from pipeline.data.storage.base import BatchedDataset
from pipeline.seeds import derive_seed
from pipeline.training import distributed
from pipeline.training.prefetch import ThreadPrefetcher


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


def pinned(batch):
    """``batch`` (tensors, possibly in tuples, lists or dicts) in page-locked memory."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, (tuple, list)):
        return type(batch)(pinned(b) for b in batch)
    if isinstance(batch, dict):
        return {k: pinned(v) for k, v in batch.items()}
    return batch


class BatchedLoader(DataLoader):
    """A DataLoader that, without workers, fetches each batch of a ``BatchedDataset`` with a plain loop.

    The stock single-process iterator spends tens of microseconds per batch on bookkeeping (a profiler
    record_function, tracing checks), a large share of a small memmap batch's cost. This loop does what its
    fetcher does -- ``__getitems__``, then ``collate_fn``, then pinning if asked -- in the batch sampler's
    order. With workers, or for any other dataset, it is the stock DataLoader."""

    def __iter__(self):
        if self.num_workers > 0 or not isinstance(self.dataset, BatchedDataset):
            return super().__iter__()
        return self._direct()

    def _direct(self):
        dataset, collate, pin = self.dataset, self.collate_fn, self.pin_memory
        for request in self.batch_sampler:
            batch = collate(dataset.__getitems__(request))
            yield pinned(batch) if pin else batch


class EpochLoader:
    """One epoch of batches per pass over ``dataloader`` (module docstring); ``sampler`` is its epoch
    sampler (a batch sampler, or ``EpochShuffle``)."""

    def __init__(self, dataloader: DataLoader, sampler, *, seed: int, augment=None, prefetch: int = 0):
        self.dataloader, self.sampler = dataloader, sampler
        self.augment, self.seed, self.prefetch = augment, int(seed), int(prefetch)
        self.rank = distributed.rank()
        self.epoch = 0

    @property
    def dataset(self):
        return self.dataloader.dataset

    @property
    def generator(self) -> torch.Generator:
        return self.dataloader.generator

    @property
    def num_workers(self) -> int:
        return self.dataloader.num_workers

    @property
    def pin_memory(self) -> bool:
        return self.dataloader.pin_memory

    @property
    def batch_size(self) -> int:
        return self.dataloader.batch_size or self.sampler.batch_size

    @property
    def drop_last(self) -> bool:
        return bool(self.dataloader.drop_last if self.dataloader.batch_size else self.sampler.drop_last)

    @property
    def num_samples(self) -> int:
        """Samples this rank's loader yields per epoch (before drop_last)."""
        return self.sampler.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataloader)

    def _augmented(self, epoch: int):
        for b, (x, y) in enumerate(self.dataloader):
            g = torch.Generator()
            g.manual_seed(derive_seed(self.seed, "augment", epoch, b, self.rank))
            yield self.augment(x, g), y

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        batches = self._augmented(epoch) if self.augment is not None else self.dataloader
        if self.prefetch > 0:
            return iter(ThreadPrefetcher(batches, self.prefetch))
        return iter(batches)


def build_loader(dataset, cfg, *, seed: int, train: bool, device: torch.device, augment=None) -> EpochLoader:
    generator = torch.Generator()
    generator.manual_seed(int(seed) + (0 if train else 1))
    shuffle = bool(cfg.shuffle) if train else False
    drop_last = bool(cfg.drop_last) if train else False
    if isinstance(dataset, BatchedDataset):
        sampler = dataset.batch_sampler(cfg.batch_size, shuffle, drop_last, seed)
        if distributed.active():  # under torchrun: this rank's share
            sampler = sampler.for_rank(distributed.rank(), distributed.world_size())
        kwargs = dict(batch_sampler=sampler, collate_fn=dataset.collate_fn)
        if cfg.num_workers > 0:
            dataset.share_with_workers(cfg.num_workers)
    else:
        sampler = EpochShuffle(len(dataset), seed, shuffle)
        if distributed.active():
            sampler = sampler.for_rank(distributed.rank(), distributed.world_size())
        kwargs = dict(batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last)
    kwargs.update(
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
    loader = BatchedLoader(dataset, **kwargs)
    augment = augment if train else None  # batched, in this process (inside the prefetch thread if any)
    return EpochLoader(loader, sampler, seed=seed, augment=augment, prefetch=cfg.thread_prefetch)
