"""Several processes, one training: torchrun + DistributedDataParallel, with one MLflow run from rank 0.

    torchrun --standalone --nproc_per_node=2 -m pipeline trainer.epochs=2     # 2 processes, this machine

Nothing to configure: under torchrun (``WORLD_SIZE`` > 1 in the environment) the pipeline

- joins the process group (``init(device)``: gloo on CPU, nccl on CUDA, one GPU per ``LOCAL_RANK``);
- exports on rank 0 only; the other ranks wait at a barrier, then open the export (``rank0_first``);
- gives each loader this rank's share of every epoch (pipeline.training.loading: the sampler's
  ``for_rank``, pipeline/data/sampling.py), without padding, so every sample is seen exactly once per
  epoch across ranks (shards: each rank reads its own part of every shard). Ranks may then hold one batch
  more or less than each other; the train loop runs inside DDP's ``Join`` (``joined``), which keeps the
  gradient all-reduce of the ranks that run out first going;
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
