"""Load stage: loaders over the exported train and val ids, built from the ``loader`` config.

    from pipeline.training.loading import build_loader
    train_loader = build_loader(train_ds, cfg.loader, seed=cfg.trainer.seed, train=True, device=dev,
                                transform=train_tf)
    for x, y in train_loader: ...              # one epoch per pass
    train_loader.set_epoch(3)                  # the next pass is epoch 3's (resume)
    train_loader.batch_size, train_loader.drop_last, train_loader.num_samples   # this rank's, per epoch

``build_loader`` returns an ``EpochLoader``. A storage format's dataset (``BatchedDataset``,
pipeline/data/storage/base.py) gives its batch sampler (pipeline/data/sampling.py), and each batch is
assembled by pipeline/training/handoff/ (the dataset's read on ``loader.decode_threads`` threads, then the
per-sample ``transform``):

- with ``loader.num_workers=0``, in this process: a plain loop over the sampler's batches (the stock
  single-process iterator's bookkeeping costs a large share of a cheap batch);
- with workers, in the project's own loader workers (pipeline/training/handoff/pool.py: torch's worker
  machinery alone costs more per batch than a cheap batch), each batch straight into a slot of the worker's
  ring of shared memory (allocated once, page-locked once on CUDA), which crosses to this process as a few
  integers; the batch's tensors view the slot until they are garbage (pipeline/training/handoff/slots.py).

Any other map-style Dataset is read item by item in ``EpochShuffle``'s order by a stock DataLoader. Either
way epoch e's batches are a function of (trainer seed, e) only, whatever ``num_workers``,
``decode_threads``, ``persistent_workers`` or ``thread_prefetch`` are; under torchrun each rank takes its
share (``for_rank``). Worker seeds come from a ``torch.Generator`` seeded from the trainer seed, and each
worker seeds numpy and ``random`` from its torch seed. ``prefetch_factor`` and ``persistent_workers`` are
passed only with workers (DataLoader rejects them otherwise); ``pin_memory=auto`` pins only when training
on CUDA; ``multiprocessing_context=auto`` forks where the platform can (launchers such as joblib change the
default start method to one DataLoader workers cannot use). A worker that dies:
pipeline/training/workers.py. ``loader.thread_prefetch > 0`` runs the loader in a background thread that
prepares that many batches ahead (pipeline.training.prefetch).
"""

from __future__ import annotations

import multiprocessing as mp
import random
import weakref

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from pipeline.data.sampling import EpochShuffle
from pipeline.data.storage.base import BatchedDataset
from pipeline.training import distributed
from pipeline.training.handoff.assemble import Assembler
from pipeline.training.handoff.pool import WorkerPool
from pipeline.training.handoff.slots import SlotRings
from pipeline.training.prefetch import ThreadPrefetcher


def seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _pin_memory(setting, device: torch.device) -> bool:
    setting = str(setting).lower()
    if setting == "auto":
        return device.type == "cuda"
    return setting == "true" and torch.cuda.is_available()


def _mp_context(setting: str):
    if setting == "auto":
        return "fork" if "fork" in mp.get_all_start_methods() else None
    return setting


class EpochLoader:
    """One epoch of batches per pass (module docstring). ``sampler`` is the epoch sampler (a batch sampler,
    or ``EpochShuffle``); ``assembler`` is None for a plain Dataset (read by the stock ``dataloader``)."""

    def __init__(
        self,
        dataset,
        sampler,
        *,
        generator: torch.Generator,
        pin: bool,
        prefetch: int = 0,
        dataloader: DataLoader | None = None,
        assembler: Assembler | None = None,
        workers: int = 0,
        prefetch_factor: int = 2,
        persistent: bool = False,
        context: str | None = None,
    ) -> None:
        self.dataset, self.sampler, self.dataloader, self.assembler = dataset, sampler, dataloader, assembler
        self.generator, self.pin, self.prefetch = generator, bool(pin), int(prefetch)
        self.workers, self.prefetch_factor = int(workers), int(prefetch_factor)
        self.persistent, self.context = bool(persistent), context
        self.rings: SlotRings | None = None
        self.pool: WorkerPool | None = None

    @property
    def num_workers(self) -> int:
        return self.dataloader.num_workers if self.dataloader is not None else self.workers

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size if self.assembler is not None else self.dataloader.batch_size

    @property
    def drop_last(self) -> bool:
        return bool(self.sampler.drop_last if self.assembler is not None else self.dataloader.drop_last)

    @property
    def num_samples(self) -> int:
        """Samples this rank's loader yields per epoch (before drop_last)."""
        return self.sampler.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) if self.assembler is not None else len(self.dataloader)

    def _in_process(self):
        """0 workers: each batch assembled here, in the sampler's order."""
        asm, pin = self.assembler, self.pin
        for request in self.sampler:
            x, y = asm.empty(len(request))
            asm.fill(request, x, y)
            xt, yt = torch.from_numpy(x), torch.from_numpy(y)
            yield (xt.pin_memory(), yt.pin_memory()) if pin else (xt, yt)

    def _pool(self) -> WorkerPool:
        """The rings are allocated once, before the workers first start; the workers start per pass, or once
        (``persistent_workers``)."""
        if self.rings is None:
            slots = self.prefetch_factor + self.prefetch + 2
            asm = self.assembler
            self.rings = SlotRings(self.workers, slots, asm.shape, asm.dtype, self.sampler.batch_size)
            if self.pin:
                self.rings.pin()
        if self.pool is None:
            self.pool = WorkerPool(
                self.assembler, self.rings, self.sampler, self.workers, self.prefetch_factor, self.context
            )
            weakref.finalize(self, self.pool.close)  # persistent workers end with their loader
        return self.pool

    def _from_workers(self):
        """Workers' seeds come from the loader's generator each pass, as torch's DataLoader's do."""
        pool = self._pool()
        base = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator).item())
        epoch = self.sampler.next_epoch() if pool.replicated else None  # else the pass over it advances it
        try:
            yield from pool.run(epoch, base)
        finally:
            if not self.persistent:
                pool.close()

    def close(self) -> None:
        """End the loader's worker processes (they end with the process anyway)."""
        if self.pool is not None:
            self.pool.close()

    def __iter__(self):
        if self.assembler is None:
            batches = iter(self.dataloader)
        elif self.workers > 0:
            batches = self._from_workers()
        else:
            batches = self._in_process()
        if self.prefetch > 0:
            return iter(ThreadPrefetcher(batches, self.prefetch))
        return batches


def build_loader(
    dataset, cfg, *, seed: int, train: bool, device: torch.device, transform=None
) -> EpochLoader:
    if not OmegaConf.is_config(cfg):  # a LoaderConfig built in code
        cfg = OmegaConf.structured(cfg)
    generator = torch.Generator()
    generator.manual_seed(int(seed) + (0 if train else 1))
    shuffle = bool(cfg.shuffle) if train else False
    drop_last = bool(cfg.drop_last) if train else False
    workers, pin = int(cfg.num_workers), _pin_memory(cfg.pin_memory, device)
    prefetch = int(cfg.get("thread_prefetch", 0))
    common = dict(num_workers=workers, worker_init_fn=seed_worker, generator=generator)
    if workers > 0:
        common.update(
            prefetch_factor=cfg.prefetch_factor,
            persistent_workers=bool(cfg.persistent_workers),
            multiprocessing_context=_mp_context(cfg.multiprocessing_context),
        )
    if not isinstance(dataset, BatchedDataset):  # any map-style Dataset: item by item, torch's collate
        sampler = EpochShuffle(len(dataset), seed, shuffle)
        if distributed.active():
            sampler = sampler.for_rank(distributed.rank(), distributed.world_size())
        loader = DataLoader(
            dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last, pin_memory=pin, **common
        )
        return EpochLoader(
            dataset,
            sampler,
            dataloader=loader,
            assembler=None,
            generator=generator,
            pin=pin,
            prefetch=prefetch,
        )
    sampler = dataset.batch_sampler(cfg.batch_size, shuffle, drop_last, seed)
    if distributed.active():  # under torchrun: this rank's share
        sampler = sampler.for_rank(distributed.rank(), distributed.world_size())
    assembler = Assembler(dataset, transform, seed, cfg.get("decode_threads", 0))
    if workers > 0:
        dataset.share_with_workers(workers)
    return EpochLoader(
        dataset,
        sampler,
        generator=generator,
        pin=pin,
        prefetch=prefetch,
        assembler=assembler,
        workers=workers,
        prefetch_factor=int(cfg.prefetch_factor),
        persistent=bool(cfg.persistent_workers),
        context=_mp_context(cfg.multiprocessing_context),
    )
