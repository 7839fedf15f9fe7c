"""Train stage: the epoch loop and its per-epoch metrics.

    from pipeline.training.train import fit
    final = fit(model, train_loader, val_loader, cfg.trainer, device=device,
                memory=sampler, on_epoch=lambda epoch, metrics: print(epoch, metrics))
    fit(..., optimizer=optimizer, start_epoch=2, samples_seen=n)   # resume: epochs 2.. on top of n
    fit(..., sample_bytes=exp.stored_sample_bytes)                 # adds io/read_amplification
    total, correct, n, wait = train_pass(net, batches, optimizer, loss_fn, device)  # the step, one pass

Per epoch: the metrics that pipeline/metrics.py defines as logged every epoch (``Logged.EPOCH``: train and
val loss and accuracy, ``perf/*`` timings, ``train/samples_seen``, ``io/read_*`` and, with a memory sampler,
``memory/epoch_peak_<figure>``); their meaning, units and direction are defined there only. With a
sampler, epoch starts are marked on its timeline and its budget is checked on every step. The I/O
figures cover the train pass (main process + DataLoader workers, live or exited;
pipeline.system.iocount, read at the pass's start and end only, summed over ranks). At the end
the samples this call trained on are checked against what the loaders promise (len(train) x the
epochs run, less what ``drop_last`` drops on each rank).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from torch import nn

from pipeline import progress
from pipeline.system.iocount import disk_read_bytes
from pipeline.training import distributed

log = logging.getLogger(__name__)


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={setting} but CUDA is not available; use auto or cpu")
    return device


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"Unknown optimizer {cfg.optimizer!r}; valid: adam, adamw, sgd")


def expected_samples(n_train: int, batch_size: int, drop_last: bool, epochs: int) -> int:
    per_epoch = (n_train // batch_size) * batch_size if drop_last else n_train
    return per_epoch * epochs


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, memory=None) -> tuple[float, float]:
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    for x, y in loader:
        if memory is not None:
            memory.check("during validation")
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        total += loss_fn(out, y)
        correct += (out.argmax(1) == y).sum()
        n += len(y)
    total, correct, n = distributed.sum_all(total, correct, n)  # torchrun: over all ranks' shards
    return (total.item() / max(n, 1), correct.item() / max(n, 1))


def io_metrics(read_bytes: int, seconds: float, delivered_bytes: int | None) -> dict:
    out = {
        "io/read_mb": read_bytes / 1e6,
        "io/read_mb_per_s": read_bytes / 1e6 / seconds if seconds > 0 else 0.0,
    }
    if delivered_bytes:
        out["io/read_amplification"] = read_bytes / delivered_bytes
    return out


def remote_metrics(stats, seconds: float) -> dict:
    """An epoch's fetches from object storage (pipeline/data/remote/cache.py ``CacheStats``): MB downloaded,
    MB/s over the train pass, and the share of shard fetches the local cache answered."""
    return {
        "io/remote_mb": stats.remote_mb,
        "io/remote_mb_per_s": stats.remote_mb / seconds if seconds > 0 else 0.0,
        "io/cache_hit_fraction": stats.hit_fraction,
    }


def train_pass(net, batches, optimizer, loss_fn, device: torch.device, memory=None, where: str = ""):
    """The training step on every batch of ``batches`` (any iterable of (x, y)): what ``fit`` runs each epoch,
    and what pipeline-tune times (pipeline/tune/trials.py). Returns (summed loss, correct predictions,
    samples, seconds spent waiting for the next batch); the first two are tensors on ``device``."""
    total = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    wait = 0.0
    batches = iter(batches)
    while True:
        tw = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            break
        wait += time.perf_counter() - tw
        if memory is not None:
            if n == 0:
                memory.sample_soon()  # workers are alive now, however short the epoch (not on this thread)
            memory.check(where)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        out = net(x)
        loss = loss_fn(out, y)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(y)
        correct += (out.argmax(1) == y).sum()
        n += len(y)
    return total, correct, n, wait


def fit(
    model,
    train_loader,
    val_loader,
    cfg,
    *,
    device: torch.device,
    memory=None,
    on_epoch: Callable[[int, dict], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start_epoch: int = 0,
    samples_seen: int = 0,
    sample_bytes: float | None = None,
    files=None,
) -> dict:
    model.to(device)
    net = distributed.wrap(model, device)  # DDP under torchrun, else model
    optimizer = optimizer if optimizer is not None else build_optimizer(model, cfg)
    loss_fn = nn.CrossEntropyLoss()
    seen = 0
    metrics: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        train_loader.set_epoch(epoch)
        if memory is not None:
            memory.mark_epoch(epoch)
        read0 = disk_read_bytes()
        remote0 = files.stats() if files is not None else None  # data in object storage: this epoch's GETs
        t0 = time.perf_counter()
        batches = distributed.joined(progress.batches(train_loader, f"epoch {epoch + 1}/{cfg.epochs}"), net)
        total, correct, n, wait = train_pass(
            net, batches, optimizer, loss_fn, device, memory, f"in epoch {epoch}"
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - t0
        read = disk_read_bytes() - read0 if read0 is not None else 0  # workers of the pass included
        total, correct, n, read = distributed.sum_all(total, correct, n, read)  # torchrun: global figures
        seen += n
        tv = time.perf_counter()
        val_loss, val_acc = evaluate(model, val_loader, device, memory)
        metrics = {
            "train/loss": total.item() / max(n, 1),
            "train/accuracy": correct.item() / max(n, 1),
            "val/loss": val_loss,
            "val/accuracy": val_acc,
            "perf/epoch_seconds": train_s,
            "perf/train_samples_per_s": n / train_s if train_s > 0 else 0.0,
            "perf/data_wait_fraction": wait / train_s if train_s > 0 else 0.0,
            "perf/data_wait_seconds": wait,
            "perf/compute_seconds": train_s - wait,
            "perf/val_seconds": time.perf_counter() - tv,
            "train/samples_seen": samples_seen + seen,
        }
        if read0 is not None:
            metrics.update(io_metrics(read, train_s, n * sample_bytes if sample_bytes else None))
        if remote0 is not None:
            metrics.update(remote_metrics(files.stats() - remote0, train_s))
        if memory is not None:
            metrics.update({f"memory/epoch_peak_{k}": v for k, v in memory.take_epoch().items()})
            memory.check(f"at the end of epoch {epoch}")
        log.info(
            "epoch %d/%d  train loss %.4f acc %.3f | val loss %.4f acc %.3f | %.0f samples/s, "
            "%.0f%% waiting for data, %.0f MB read from disk",
            epoch + 1,
            cfg.epochs,
            metrics["train/loss"],
            metrics["train/accuracy"],
            val_loss,
            val_acc,
            metrics["perf/train_samples_per_s"],
            100 * metrics["perf/data_wait_fraction"],
            metrics.get("io/read_mb", 0.0),
        )
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    epochs = cfg.epochs - start_epoch
    expected = distributed.sum_all(
        expected_samples(train_loader.num_samples, train_loader.batch_size, train_loader.drop_last, epochs)
    )
    if seen != expected:
        raise RuntimeError(
            f"trained on {seen} samples, expected {expected} "
            f"(len(train)={len(train_loader.dataset)} x {epochs} epochs)"
        )
    return metrics
