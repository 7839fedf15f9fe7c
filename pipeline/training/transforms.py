"""The ``transform`` group: batched train-time augmentation, and the train split's normalisation figures.

    pipeline transform=flip_crop                   # flip + crop (padding 4) + normalise
    from pipeline.training.transforms import FlipCrop, train_stats
    augment = FlipCrop.from_config(cfg.transform)  # None when the config augments nothing
    loader = build_loader(ds, cfg.loader, seed=s, train=True, device=dev, augment=augment)
    mean, std = train_stats(train_ds, exp.spec)    # per channel, of the values the model sees
    model = build_model(cfg.model, exp.spec, stats=(mean, std))

Augmentation (train batches only): a random horizontal flip (p = 0.5 per sample) and a random crop
of the original size from the sample zero-padded by ``crop_padding`` pixels, one call per batch --
one zero-padded copy of the batch, then one window copy per sample -- on the stored dtype (uint8
stays uint8; padding with 0 is code 0, value 0). The random draws of batch b of epoch e come from a
generator seeded with ``derive_seed(trainer.seed, "augment", e, b, rank)``, so a batch is
augmented the same way with 0 or N DataLoader workers, with or without thread prefetch, and after a
resume. It runs in the main process, after the DataLoader (pipeline.training.loading's ``EpochLoader``;
with ``loader.thread_prefetch`` inside the prefetch thread): it costs a few us a sample, and running it
in the workers instead bought nothing measurable (``python -m benchmarks.augment``,
docs/compact-samples.md).

Normalisation is not done here but in the model's first layer (pipeline/training/models.py), so that
validation, plots and the logged model see it too; ``train_stats`` measures its mean and std per
channel (the last axis of [H, W, C] samples, one figure otherwise) over the train split, in one
sequential pass over the decoded values, accumulated in float64.
"""

from __future__ import annotations

import numpy as np
import torch

STATS_CHUNK = 4096  # samples read per step while measuring the train split


def flip_crop(x: torch.Tensor, flip: torch.Tensor, top: torch.Tensor, left: torch.Tensor, padding: int):
    """Batch ``x`` (CPU) [B, H, W] or [B, H, W, C]: sample i mirrored left-right where ``flip[i]``, then
    the H x W window at (``top[i]``, ``left[i]``) of it zero-padded by ``padding`` (offsets 0..2*padding).

    One zero-padded copy of the batch, one ``torch.flip`` of the mirrored samples, then one window
    copy per sample (numpy slices, no Python arithmetic per pixel): 5-10x faster on CPU than a single
    gather with per-pixel indices, and 3x faster on RGB than copying numpy's reversed views."""
    xn = x.numpy()
    b, h, w = xn.shape[:3]
    if padding:
        padded = np.zeros((b, h + 2 * padding, w + 2 * padding, *xn.shape[3:]), dtype=xn.dtype)
        padded[:, padding : padding + h, padding : padding + w] = xn
    else:
        padded = xn
    flipped = [i for i, f in enumerate(flip.tolist()) if f]
    source = list(padded)  # each sample's padded image (views)
    if flipped:
        mirrored = torch.from_numpy(padded[flipped]).flip(2).numpy()
        for k, i in enumerate(flipped):
            source[i] = mirrored[k]
    out = np.empty_like(xn)
    for i, (t, left_i) in enumerate(zip(top.tolist(), left.tolist())):
        out[i] = source[i][t : t + h, left_i : left_i + w]
    return torch.from_numpy(out)


class FlipCrop:
    """Random flip and padded crop of whole batches, the draws a function of the generator only."""

    def __init__(self, flip: bool, padding: int) -> None:
        self.flip, self.padding = bool(flip), int(padding)

    @classmethod
    def from_config(cls, cfg) -> "FlipCrop | None":
        if cfg is None or (not cfg.flip and not cfg.crop_padding):
            return None
        return cls(cfg.flip, cfg.crop_padding)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() not in (3, 4):
            raise ValueError(f"flip/crop needs image batches [B, H, W] or [B, H, W, C], got {list(x.shape)}")
        b = x.shape[0]
        flip = torch.rand(b, generator=generator) < 0.5 if self.flip else torch.zeros(b, dtype=torch.bool)
        top, left = torch.randint(0, 2 * self.padding + 1, (2, b), generator=generator)
        return flip_crop(x, flip, top, left, self.padding)


def _batches(dataset, chunk: int):
    """The dataset's samples in position order, ``chunk`` at a time (one batched read for a format's
    ``BatchedDataset``, item by item for any other Dataset)."""
    from pipeline.data.storage.base import BatchedDataset

    for start in range(0, len(dataset), chunk):
        idx = list(range(start, min(start + chunk, len(dataset))))
        if isinstance(dataset, BatchedDataset):
            x = dataset.__getitems__(idx)[0]
        else:
            x = torch.stack([dataset[i][0] for i in idx])
        yield torch.as_tensor(x)


def train_stats(dataset, spec, chunk: int = STATS_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per channel (float32) of the values the model sees (uint8 codes decoded by the
    model's own input layer) over every sample of ``dataset``; std 0 (a constant channel) becomes 1."""
    from pipeline.training.models import Input

    decode = Input(spec.dtype, spec.divisor)
    channels = spec.shape[-1] if len(spec.shape) == 3 else 1
    total = np.zeros(channels)
    squares = np.zeros(channels)
    n = 0
    with torch.no_grad():
        for x in _batches(dataset, chunk):
            v = decode(x).numpy().reshape(-1, channels).astype(np.float64)
            total += v.sum(axis=0)
            squares += (v * v).sum(axis=0)
            n += len(v)
    if n == 0:
        raise ValueError("transform.normalize needs a non-empty train split")
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    std[std == 0] = 1.0
    if channels == 1:  # one figure for grey images and flat samples: broadcasts over any shape
        mean, std = mean[0], std[0]
    return np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
