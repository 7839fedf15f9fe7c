"""Load stage: DataLoaders over the exported train and val ids, built from the ``loader`` config.

    from pipeline.loading import build_loader
    train_loader = build_loader(train_ds, cfg.loader, seed=cfg.trainer.seed, train=True, device=dev)

Shuffling uses ``seeding.EpochShuffle``: epoch e's order is a function of (trainer seed, e) only,
whatever ``num_workers``/``persistent_workers`` are. Worker seeds come from a ``torch.Generator``
seeded from the trainer seed, and each worker seeds numpy and ``random`` from its torch seed.
``prefetch_factor`` and ``persistent_workers`` are passed only with workers (DataLoader rejects
them otherwise); ``pin_memory=auto`` pins only when training on CUDA; ``multiprocessing_context=auto``
forks where the platform can (launchers such as joblib change the default start method to one
DataLoader workers cannot use). Inside ``worker_deaths_explained()`` a worker that dies (killed, out of
memory) ends the run with a ``WorkerDied`` that names it and says what to do, raised by the loader
rather than by torch's SIGCHLD handler at whatever line the main thread happens to be on.

A storage format's Dataset may offer two optional hooks, used when present: ``batch_sampler(
batch_size, shuffle, drop_last, seed)`` returning a batch sampler (e.g. the shards block
shuffle), and ``collate_fn`` (e.g. a pass-through when ``__getitems__`` returns whole batches).
``loader.thread_prefetch > 0`` wraps the loader in pipeline.prefetch.ThreadPrefetcher (a background
thread prepares that many batches ahead, in process). ``batching(loader)`` gives the batch size and
drop_last whichever way the batches are made.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import random
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils.pin_memory import pin_memory

from pipeline import distributed
from pipeline.prefetch import ThreadPrefetcher
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


def batching(loader) -> tuple[int, bool]:
    """(batch_size, drop_last) of a DataLoader, also when a batch sampler makes the batches."""
    if getattr(loader, "batch_size", None) is not None:
        return loader.batch_size, bool(loader.drop_last)
    sampler = loader.batch_sampler
    return sampler.batch_size, bool(sampler.drop_last)


IPC_GRACE_S = 5.0  # how long a broken batch transfer waits for its worker to show as dead


class BatchedLoader(DataLoader):
    """A DataLoader that, without workers, fetches each batch of a map-style dataset with a plain loop.

    The stock single-process iterator spends ~20-30 us per batch on bookkeeping (a profiler
    record_function, tracing checks), a third of the cost of a 64-sample memmap batch. This loop
    does what its fetcher does -- ``__getitems__`` (or one ``dataset[i]`` per index), then
    ``collate_fn``, then pinning if asked -- and draws the same per-epoch seed from ``generator``, so
    the order matches the stock iterator's. With workers it is the stock DataLoader.
    """

    def __iter__(self):
        map_style = not isinstance(self.dataset, torch.utils.data.IterableDataset)
        if self.num_workers > 0 or self.batch_sampler is None or not map_style:
            return super().__iter__()
        return self._direct()

    def _get_iterator(self):
        batches = super()._get_iterator()
        if self.num_workers > 0:
            _name_dead_worker_on_broken_transfer(batches)
        return batches

    def _direct(self):
        batches = iter(self.batch_sampler)
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # as the stock iterator
        dataset, collate, pin = self.dataset, self.collate_fn, self.pin_memory
        getitems = getattr(dataset, "__getitems__", None)
        for indices in batches:
            data = getitems(indices) if getitems else [dataset[i] for i in indices]
            batch = collate(data)
            yield pin_memory(batch) if pin else batch


def _name_dead_worker_on_broken_transfer(batches) -> None:
    """A worker killed while the main process picks up its batch breaks the transfer (a reset
    connection, EOF) a moment before it shows as dead, so torch's own check finds every worker alive
    and re-raises the bare OSError. Here the workers get a grace period to show which one died."""
    fetch = getattr(batches, "_try_get_data", None)
    workers = getattr(batches, "_workers", None)
    if fetch is None or workers is None:  # another torch: its own checks only
        return

    def try_get_data(*args, **kwargs):
        try:
            return fetch(*args, **kwargs)
        except (OSError, EOFError) as err:
            dead = _first_to_die(workers, IPC_GRACE_S)
            if dead is None:
                raise
            code = dead.exitcode
            if code < 0:
                how = f"is killed by signal: {signal.strsignal(-code) or -code}."
            else:
                how = f"exited with code {code}."
            raise RuntimeError(f"DataLoader worker (pid {dead.pid}) {how}") from err

    batches._try_get_data = try_get_data


def _first_to_die(workers, wait_s: float):
    deadline = time.monotonic() + wait_s
    while True:
        dead = [w for w in workers if not w.is_alive()]  # is_alive reaps it and records its exit code
        if dead or time.monotonic() >= deadline:
            return dead[0] if dead else None
        time.sleep(0.05)


def build_loader(dataset, cfg, *, seed: int, train: bool, device: torch.device):
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
        kwargs.update(
            prefetch_factor=cfg.prefetch_factor,
            persistent_workers=bool(cfg.persistent_workers),
            multiprocessing_context=_mp_context(cfg.multiprocessing_context),
        )
    kwargs = distributed.shard(kwargs, dataset, seed)  # under torchrun: this rank's share
    loader = BatchedLoader(dataset, **kwargs)
    if getattr(cfg, "thread_prefetch", 0) > 0:  # hand-made loader configs may lack it
        return ThreadPrefetcher(loader, cfg.thread_prefetch)
    return loader


class WorkerDied(RuntimeError):
    """A DataLoader worker process died mid-epoch (killed, or out of memory): the run stops."""


def _worker_error_in_chain(err: BaseException) -> RuntimeError | None:
    """torch's dead-worker RuntimeError, found in ``err`` or in what it wraps: the SIGCHLD may land
    inside a library (MLflow, SQLAlchemy) that re-raises it as its own exception type."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, RuntimeError) and "DataLoader worker" in str(cur):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def worker_failure(err: BaseException, recorded: Sequence[RuntimeError] = ()) -> WorkerDied | None:
    """A clear error for a dead DataLoader worker, or None when ``err`` is something else.

    Worker death shows up as: a death torch's SIGCHLD handler found (``recorded`` by
    ``worker_deaths_explained``); the loader's own error when it waited for the dead worker's batch,
    or when the worker died while handing its batch over (see BatchedLoader); or torch's error
    wrapped by a library it interrupted."""
    if isinstance(err, WorkerDied):
        return err
    found = recorded[0] if recorded else _worker_error_in_chain(err)
    if found is None:
        return None
    return WorkerDied(
        f"{str(found).strip()} -- a DataLoader worker process died mid-epoch, so the run stopped rather than "
        "train on an incomplete epoch. A worker killed by signal 9 (Killed) is usually the kernel's OOM "
        "killer (see `dmesg`): lower loader.num_workers, loader.batch_size or loader.prefetch_factor"
    )


@contextmanager
def worker_deaths_explained():
    """Inside: a dead DataLoader worker -- however it surfaces, see ``worker_failure`` -- becomes a
    WorkerDied that names the worker and says what to do; anything else passes through unchanged.

    torch's SIGCHLD handler raises its error in the main thread wherever it is -- inside MLflow's
    database session, a logging handler (which swallows it), a checkpoint write, or this very
    clean-up. Inside, it runs quietly instead: a death it finds is recorded, and the loader itself
    raises when it waits for the dead worker's batch (torch checks its workers every 5 s)."""
    deaths: list[RuntimeError] = []
    restore = _record_torch_sigchld_errors(deaths)
    try:
        yield
    except WorkerDied:
        raise
    except Exception as err:
        clear = worker_failure(err, deaths)
        if clear is None:
            raise
        # drop the frames' references to the dead loader's iterator so it shuts down now (its
        # workers leave torch's watch list first), and the job's other loaders with their workers
        traceback.clear_frames(err.__traceback__)
        gc.collect()
        raise clear from err
    finally:
        restore()


def _record_torch_sigchld_errors(deaths: list) -> Callable[[], None]:
    """Wrap torch's SIGCHLD handler (installed now if it was not yet) so that its dead-worker error is
    appended to ``deaths`` instead of raised; returns the function that puts it back. Only the main
    thread may change handlers, and torch installs its handler only there: elsewhere nothing changes."""
    if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
        return lambda: None
    from torch.utils.data._utils import signal_handling

    install = getattr(signal_handling, "_set_SIGCHLD_handler", None)
    if install is not None:
        install()  # torch's, once per process: loaders created later find it set and keep ours
    inner = signal.getsignal(signal.SIGCHLD)

    def record(signum, frame) -> None:
        try:
            if callable(inner):
                inner(signum, frame)
        except RuntimeError as err:
            deaths.append(err)

    signal.signal(signal.SIGCHLD, record)
    return lambda: signal.signal(signal.SIGCHLD, inner if inner is not None else signal.SIG_DFL)
