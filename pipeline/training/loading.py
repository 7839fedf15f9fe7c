"""Load stage: DataLoaders over the exported train and val ids, built from the ``loader`` config.

    from pipeline.training.loading import build_loader
    train_loader = build_loader(train_ds, cfg.loader, seed=cfg.trainer.seed, train=True, device=dev)

Shuffling uses ``seeding.EpochShuffle``: epoch e's order is a function of (trainer seed, e) only,
whatever ``num_workers``/``persistent_workers`` are. Worker seeds come from a ``torch.Generator``
seeded from the trainer seed, and each worker seeds numpy and ``random`` from its torch seed.
``prefetch_factor`` and ``persistent_workers`` are passed only with workers (DataLoader rejects
them otherwise); ``pin_memory=auto`` pins only when training on CUDA; ``multiprocessing_context=auto``
forks where the platform can (launchers such as joblib change the default start method to one
DataLoader workers cannot use). A worker that dies: pipeline/training/workers.py.

A storage format's Dataset may offer two optional hooks, used when present: ``batch_sampler(
batch_size, shuffle, drop_last, seed)`` returning a batch sampler (e.g. the shards block
shuffle), and ``collate_fn`` (e.g. a pass-through when ``__getitems__`` returns whole batches).
``augment`` (train loaders only; pipeline.training.transforms) transforms each batch in this process,
seeded per (seed, epoch, batch). ``loader.thread_prefetch > 0`` wraps the loader in
pipeline.training.prefetch.ThreadPrefetcher (a background thread prepares that many batches ahead, in
process, augmentation included). ``batching(loader)`` gives the batch size and
drop_last whichever way the batches are made.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import random

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.training import distributed
from pipeline.training.prefetch import ThreadPrefetcher
from pipeline.training.seeding import EpochShuffle
from pipeline.training.transforms import Augmented

log = logging.getLogger(__name__)


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


def batching(loader) -> tuple[int, bool]:
    """(batch_size, drop_last) of a DataLoader, also when a batch sampler makes the batches."""
    if getattr(loader, "batch_size", None) is not None:
        return loader.batch_size, bool(loader.drop_last)
    sampler = loader.batch_sampler
    return sampler.batch_size, bool(sampler.drop_last)


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
    """A DataLoader that, without workers, fetches each batch of a map-style dataset with a plain loop.

    The stock single-process iterator spends ~20-30 us per batch on bookkeeping (a profiler
    record_function, tracing checks), a third of the cost of a 64-sample memmap batch. This loop
    does what its fetcher does -- ``__getitems__`` (or one ``dataset[i]`` per index), then
    ``collate_fn``, then pinning if asked. The order comes from the batch sampler alone, so it is the
    stock iterator's. With workers it is the stock DataLoader.
    """

    def __iter__(self):
        map_style = not isinstance(self.dataset, torch.utils.data.IterableDataset)
        if self.num_workers > 0 or self.batch_sampler is None or not map_style:
            return super().__iter__()
        return self._direct()

    def _direct(self):
        batches = iter(self.batch_sampler)
        dataset, collate, pin = self.dataset, self.collate_fn, self.pin_memory
        getitems = getattr(dataset, "__getitems__", None)
        for indices in batches:
            data = getitems(indices) if getitems else [dataset[i] for i in indices]
            batch = collate(data)
            yield pinned(batch) if pin else batch


def build_loader(dataset, cfg, *, seed: int, train: bool, device: torch.device, augment=None):
    generator = torch.Generator()
    generator.manual_seed(int(seed) + (0 if train else 1))
    shuffle = bool(cfg.shuffle) if train else False
    drop_last = bool(cfg.drop_last) if train else False
    hook = getattr(dataset, "batch_sampler", None)
    batch_sampler = hook(cfg.batch_size, shuffle, drop_last, seed) if callable(hook) else None
    if batch_sampler is not None:
        kwargs = dict(batch_sampler=batch_sampler)
    else:
        sampler = EpochShuffle(len(dataset), seed) if shuffle else None
        kwargs = dict(batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last)
    if getattr(dataset, "collate_fn", None) is not None:
        kwargs["collate_fn"] = dataset.collate_fn
    kwargs.update(
        num_workers=cfg.num_workers,
        pin_memory=_pin_memory(cfg.pin_memory, device),
        worker_init_fn=seed_worker,
        generator=generator,
    )
    if cfg.num_workers > 0:
        if getattr(dataset, "WORKERS_HINT", None):
            log.warning(dataset.WORKERS_HINT)
        kwargs.update(
            prefetch_factor=cfg.prefetch_factor,
            persistent_workers=bool(cfg.persistent_workers),
            multiprocessing_context=_mp_context(cfg.multiprocessing_context),
        )
    kwargs = distributed.shard(kwargs, dataset, seed)  # under torchrun: this rank's share
    loader = BatchedLoader(dataset, **kwargs)
    if augment is not None and train:  # batched, in this process (inside the prefetch thread if any)
        loader = Augmented(loader, augment, seed, distributed.rank())
    if getattr(cfg, "thread_prefetch", 0) > 0:  # hand-made loader configs may lack it
        return ThreadPrefetcher(loader, cfg.thread_prefetch)
    return loader
