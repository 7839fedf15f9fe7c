"""Several processes, one training: torchrun + DistributedDataParallel, with one MLflow run from rank 0.

    torchrun --standalone --nproc_per_node=2 -m pipeline trainer.epochs=2     # 2 processes, this machine

Nothing to configure: under torchrun (``WORLD_SIZE`` > 1 in the environment) the pipeline

- joins the process group (``init(device)``: gloo on CPU, nccl on CUDA, one GPU per ``LOCAL_RANK``);
- exports on rank 0 only; the other ranks wait at a barrier, then open the export (``rank0_first``);
- gives each DataLoader a ``ShardSampler``: a ``DistributedSampler`` (seeded, ``set_epoch`` every epoch)
  that does not pad, so every sample is seen exactly once per epoch across ranks. A storage format's own
  batch sampler is dealt out by ``RankBatches`` (batches r, r+W, ...), or deals itself when it has
  ``for_rank(rank, world)`` (shards: each rank reads its own part of every shard). Ranks may then hold
  one batch more or less than each other; the train loop runs inside DDP's ``Join`` (``joined``), which
  keeps the gradient all-reduce of the ranks that run out first going;
- wraps the model in DDP (``wrap``), and sums loss, correct predictions and sample counts over the ranks
  (``sum_all``), so ``train/samples_seen`` and every loss/accuracy are global figures;
- creates, logs to and ends the MLflow run on rank 0 only (``is_rank0``; the others log to ``NoRun``),
  so a training is one run however many processes it has. Each rank's files go to its own folder
  (``rank_dir``: rank 0 the Hydra run dir, rank r its ``rank<r>/`` subfolder);
- at the end writes ``dist/rank<r>.json`` (its parameters' SHA-256) in the run dir per rank;
  rank 0 checks the digests are equal, tags ``dist.params_sha256`` and logs the files as artifacts.

All ranks agree on the Hydra run dir through the ``run_stamp`` resolver (pipeline/config/resolvers.py): the
time as usual, ``torchrun/<TORCHELASTIC_RUN_ID>`` under torchrun. Outside torchrun every helper here is a
no-op, so the single-process path is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

log = logging.getLogger(__name__)
T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def requested() -> bool:
    """Launched by torchrun with more than one process."""
    return world_size() > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (no-op outside torchrun); return this rank's device."""
    if not requested() or active():
        return _local_device(device)
    device = _local_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    log.info("distributed: rank %d of %d, backend %s, device %s", rank(), world_size(), backend, device)
    return device


def _local_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and requested():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def rank0_first(fn: Callable[[], T]) -> T:
    """Rank 0 runs ``fn`` (e.g. the export) while the others wait; then the others run it (reuse)."""
    if not active():
        return fn()
    if is_rank0():
        result = fn()
        barrier()
        return result
    barrier()
    return fn()


def rank_dir(path: Path) -> Path:
    """Where this rank writes its files: ``path`` on rank 0, ``path/rank<r>`` on the others."""
    return path if is_rank0() else path / f"rank{rank()}"


# ---- data ----


class ShardSampler(DistributedSampler):
    """``DistributedSampler`` without padding: rank r takes positions r, r+W, ... of the epoch's order.

    Same order as ``DistributedSampler`` (``torch.randperm`` seeded with seed + epoch), but the shards'
    sizes differ by at most one instead of repeating samples to even them out.
    """

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        return iter(order[self.rank : n : self.num_replicas])

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


class RankBatches(Sampler):
    """This rank's share of a storage format's batch sampler: batches r, r+W, r+2W, ... of each epoch.

    The inner sampler's epoch order depends on (seed, epoch) only, so every rank computes the same batches
    and takes its own; together the ranks read every sample once per epoch, without padding.
    """

    def __init__(self, inner, rank: int, world: int) -> None:
        self.inner, self.rank, self.world = inner, int(rank), int(world)
        self.batch_size, self.drop_last = inner.batch_size, inner.drop_last

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i % self.world == self.rank:
                yield batch

    def __len__(self) -> int:
        return len(range(self.rank, len(self.inner), self.world))

    @property
    def num_samples(self) -> int:
        """Samples in this rank's batches per epoch (only the epoch's last batch may be short)."""
        n_batches, bs, n = len(self.inner), self.batch_size, self.inner.n
        mine = range(self.rank, n_batches, self.world)
        total = len(mine) * bs
        if not self.drop_last and n_batches and (n_batches - 1) in mine:
            total -= n_batches * bs - n
        return total


def shard(loader_kwargs: dict, dataset, seed: int) -> dict:
    """DataLoader kwargs with a ``ShardSampler`` replacing ``shuffle`` (unchanged outside torchrun)."""
    if not active():
        return loader_kwargs
    kwargs = dict(loader_kwargs)
    if "batch_sampler" in kwargs:  # a storage format's own batches (memmap, shards): deal them out
        inner = kwargs["batch_sampler"]
        if callable(getattr(inner, "for_rank", None)):  # it deals itself (shards: each rank reads its part)
            kwargs["batch_sampler"] = inner.for_rank(rank(), world_size())
        else:
            kwargs["batch_sampler"] = RankBatches(inner, rank(), world_size())
        return kwargs
    shuffle = bool(kwargs.pop("shuffle", False)) or kwargs.get("sampler") is not None
    kwargs["sampler"] = ShardSampler(dataset, shuffle=shuffle, seed=int(seed))
    return kwargs


def local_len(loader) -> int:
    """Samples this rank's loader yields per epoch (before drop_last)."""
    batches = getattr(loader, "batch_sampler", None)
    if getattr(batches, "num_samples", None) is not None:  # RankBatches, a format's own (for_rank)
        return batches.num_samples
    sampler = getattr(loader, "sampler", None)
    return len(sampler) if isinstance(sampler, DistributedSampler) else len(loader.dataset)


# ---- model and metrics ----


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around ``model`` under torchrun, else ``model`` itself. Evaluate on the unwrapped model."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def joined(batches: Iterable, model: torch.nn.Module):
    """Iterate ``batches`` inside DDP's ``Join``, so ranks with fewer batches keep the all-reduce going."""
    if active() and hasattr(model, "join"):
        ctx = model.join()
    else:
        ctx = nullcontext()
    with ctx:
        yield from batches


def sum_all(*values):
    """Each value (tensor or number) summed over the ranks; returned in the same kinds."""
    if not active():
        return values if len(values) > 1 else values[0]
    device = next((v.device for v in values if torch.is_tensor(v)), torch.device("cpu"))
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    packed = torch.tensor(
        [float(v.item()) if torch.is_tensor(v) else float(v) for v in values],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(packed)
    out = []
    for v, s in zip(values, packed.tolist()):
        if torch.is_tensor(v):
            out.append(torch.tensor(s, dtype=v.dtype, device=v.device))
        else:
            out.append(type(v)(round(s)) if isinstance(v, int) else s)
    return tuple(out) if len(out) > 1 else out[0]


def param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def record_params(model: torch.nn.Module, run_dir: Path, tr) -> str:
    """Each rank writes ``run_dir/dist/rank<r>.json``; rank 0 checks all digests match and logs them."""
    digest = param_digest(model)
    if not active():
        return digest
    folder = Path(run_dir) / "dist"
    folder.mkdir(parents=True, exist_ok=True)
    info = {"rank": rank(), "world_size": world_size(), "params_sha256": digest}
    (folder / f"rank{rank()}.json").write_text(json.dumps(info, indent=1))
    digests: list[Any] = [None] * world_size()
    dist.all_gather_object(digests, digest)
    if is_rank0():
        tr.log_artifact(folder, "dist")
        tr.set_tags({"dist.world_size": world_size(), "dist.params_sha256": digest})
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks ended with different parameters: {digests}")
    return digest


class NoRun:
    """The tracker of ranks other than 0: takes every TrackedRun call (``tr.client.x(...)`` too) and
    does nothing."""

    run_id = None

    def __enter__(self) -> "NoRun":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __getattr__(self, name: str) -> "NoRun":
        return self

    def __call__(self, *args, **kwargs) -> "NoRun":
        return self

    def __iter__(self):
        return iter(())

    def __bool__(self) -> bool:
        return False
