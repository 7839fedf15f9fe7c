"""The ``transform`` group: per-sample train-time augmentation, resizing, and the train split's normalisation
figures.

    pipeline transform=flip_crop                           # flip + crop (padding 4) + normalise
    pipeline transform=random_resized_crop 'transform.size=[64,64]'   # image folders: crop, resize, flip
    from pipeline.training.transforms import from_config, train_stats
    train_tf, val_tf = from_config(cfg.transform, exp.spec.shape)      # None when nothing to do
    train_tf.output_shape(spec.shape)                      # what the model sees
    train_tf.apply(src, dst, u)                            # one sample; u: its uniforms (below)
    mean, std = train_stats(train_ds, exp.spec)            # per channel, of the values the model sees

**Per sample, where decoding runs.** A transform is applied to each sample as it is read into its batch --
in the DataLoader worker, or the decode thread, that reads it (pipeline/training/handoff/assemble.py) -- so
augmentation spreads over every core with the decoding. Its random draws come from ``uniforms(seed, epoch,
sample_ids, k)``: a counter-based hash (splitmix64) of (trainer seed, epoch, sample id, draw), so a sample
is augmented the same way whichever worker or thread reads it, whichever batch it lands in, and after a
resume: the metrics do not depend on ``loader.num_workers`` or ``loader.decode_threads``.

Train (``Augment``), in this order: a random resized crop (``resized_crop``: a box of ``scale`` x the area
and aspect ``ratio``, resized to ``size``; without it, the whole image resized to ``size`` when that differs
from the stored size), a horizontal flip (p = 0.5), a random crop of the same size from the sample
zero-padded by ``crop_padding`` pixels -- on the stored dtype (uint8 stays uint8; padding is code 0, value
0). Validation (``Resize``): the whole image resized to ``size``, when that differs; nothing else.
Resizing is bilinear: Pillow's for uint8 images, numpy's for others.

Normalisation is not done here but in the model's first layer (pipeline/training/models.py), so that
validation, plots and the logged model see it too; ``train_stats`` measures its mean and std per channel
(the last axis of [H, W, C] samples, one figure otherwise) over the train split as stored, in one
sequential pass over the decoded values, accumulated in float64.
"""

from __future__ import annotations

import math

import numpy as np

STATS_CHUNK = 4096  # samples read per step while measuring the train split
MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, epoch: int, sample_ids, k: int) -> np.ndarray:
    """``(len(sample_ids), k)`` floats in [0, 1): draw j of each sample, a function of (seed, epoch, sample
    id, j) only."""
    ids = np.asarray(sample_ids, dtype=np.uint64)
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF) + np.uint64(0x9E3779B97F4A7C15))
        key = _mix(key ^ np.uint64((int(epoch) + 1) & 0xFFFFFFFFFFFFFFFF))
        base = _mix(key ^ (ids * np.uint64(0x9E3779B97F4A7C15)))
        z = _mix(
            base[:, None] + np.arange(1, k + 1, dtype=np.uint64)[None, :] * np.uint64(0xD1B54A32D192ED03)
        )
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def resize_into(
    src: np.ndarray, dst: np.ndarray, box: tuple[float, float, float, float] | None = None
) -> None:
    """``src`` (the ``box`` (left, top, right, bottom) of it, default whole) resized bilinearly into ``dst``
    ([h, w] or [h, w, C], same dtype)."""
    h, w = src.shape[:2]
    box = box or (0.0, 0.0, float(w), float(h))
    oh, ow = dst.shape[:2]
    if src.dtype == np.uint8 and (src.ndim == 2 or src.shape[2] in (1, 3, 4)):
        from PIL import Image

        img = Image.fromarray(src[:, :, 0] if src.ndim == 3 and src.shape[2] == 1 else src)
        out = np.asarray(img.resize((ow, oh), Image.BILINEAR, box=box))
        dst[...] = out.reshape(dst.shape)
        return
    left, top, right, bottom = box
    ys = np.clip(top + (np.arange(oh) + 0.5) * (bottom - top) / oh - 0.5, 0, h - 1)
    xs = np.clip(left + (np.arange(ow) + 0.5) * (right - left) / ow - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0).reshape(-1, 1), (xs - x0).reshape(1, -1)
    if src.ndim == 3:
        wy, wx = wy[..., None], wx[..., None]
    s = src.astype(np.float64, copy=False)
    top_row = s[y0][:, x0] * (1 - wx) + s[y0][:, x1] * wx
    bottom_row = s[y1][:, x0] * (1 - wx) + s[y1][:, x1] * wx
    dst[...] = (top_row * (1 - wy) + bottom_row * wy).astype(dst.dtype)


def flip_crop_into(src: np.ndarray, dst: np.ndarray, flip: bool, top: int, left: int, padding: int) -> None:
    """``src`` mirrored left-right when ``flip``, then the window of its size at (``top``, ``left``) of it
    zero-padded by ``padding`` (offsets 0..2 x padding), into ``dst`` (same shape)."""
    h, w = src.shape[:2]
    img = src[:, ::-1] if flip else src
    y0, y1 = max(0, padding - top), min(h, padding + h - top)
    x0, x1 = max(0, padding - left), min(w, padding + w - left)
    if y0 or x0 or y1 < h or x1 < w:
        dst[...] = 0
    if y1 > y0 and x1 > x0:
        dst[y0:y1, x0:x1] = img[
            y0 + top - padding : y1 + top - padding, x0 + left - padding : x1 + left - padding
        ]


class SampleTransform:
    """One sample in, one sample out: ``output_shape`` of a stored shape; ``apply(src, dst, u)`` with the
    sample's ``draws`` uniforms ``u``."""

    draws = 0

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def apply(self, src: np.ndarray, dst: np.ndarray, u: np.ndarray) -> None:
        raise NotImplementedError


def _sized(shape, size) -> tuple[int, ...]:
    return tuple(shape) if size is None else (int(size[0]), int(size[1]), *tuple(shape)[2:])


class Resize(SampleTransform):
    """The whole image resized to ``size`` (validation)."""

    def __init__(self, size) -> None:
        self.size = tuple(int(s) for s in size)

    def output_shape(self, shape):
        return _sized(shape, self.size)

    def apply(self, src, dst, u) -> None:
        resize_into(src, dst)


class Augment(SampleTransform):
    """Train-time augmentation (module docstring)."""

    draws = 7  # flip, crop top, crop left, area, log-ratio, box x, box y

    def __init__(
        self, flip=False, padding=0, resized_crop=False, size=None, scale=(0.08, 1.0), ratio=(0.75, 4 / 3)
    ):
        self.flip, self.padding, self.resized_crop = bool(flip), int(padding), bool(resized_crop)
        self.size = None if size is None else tuple(int(s) for s in size)
        self.scale, self.ratio = tuple(float(s) for s in scale), tuple(float(r) for r in ratio)

    def output_shape(self, shape):
        return _sized(shape, self.size)

    def box(self, h: int, w: int, u: np.ndarray) -> tuple[float, float, float, float]:
        """The random resized crop's box (left, top, right, bottom): area ``scale``, aspect ``ratio`` (log
        uniform), clamped to the image, placed uniformly."""
        area = h * w * (self.scale[0] + u[3] * (self.scale[1] - self.scale[0]))
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = math.exp(log_lo + u[4] * (log_hi - log_lo))
        bw = min(float(w), math.sqrt(area * aspect))
        bh = min(float(h), math.sqrt(area / aspect))
        left, top = u[5] * (w - bw), u[6] * (h - bh)
        return (left, top, left + bw, top + bh)

    def apply(self, src, dst, u) -> None:
        h, w = src.shape[:2]
        img = src
        if self.resized_crop or (self.size is not None and self.size != (h, w)):
            img = np.empty(dst.shape, dtype=dst.dtype)
            resize_into(src, img, self.box(h, w, u) if self.resized_crop else None)
        if self.padding or self.flip:
            pad = self.padding
            top, left = int(u[1] * (2 * pad + 1)), int(u[2] * (2 * pad + 1))
            flip_crop_into(img, dst, self.flip and u[0] < 0.5, top, left, pad)
        elif img is not dst:
            dst[...] = img


def from_config(cfg, shape) -> tuple[SampleTransform | None, SampleTransform | None]:
    """(train transform, val transform) of the ``transform`` config for samples of ``shape``; None where
    the samples reach the model as stored."""
    if cfg is None:
        return None, None
    size = None if cfg.get("size") is None else tuple(int(s) for s in cfg.size)
    if size == tuple(shape[:2]):
        size = None
    train = None
    if cfg.flip or cfg.crop_padding or cfg.get("resized_crop", False) or size is not None:
        train = Augment(
            cfg.flip,
            cfg.crop_padding,
            cfg.get("resized_crop", False),
            size,
            cfg.get("scale"),
            cfg.get("ratio"),
        )
    return train, (Resize(size) if size is not None else None)


def _batches(dataset, chunk: int):
    """The dataset's samples in position order, ``chunk`` at a time (one batched read for a format's
    ``BatchedDataset``, item by item for any other Dataset)."""
    import torch

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
    import torch

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
