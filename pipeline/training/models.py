"""Models sized from the exported data: ``mlp`` for any sample shape, ``cnn`` for [H, W] or [H, W, C].

    from pipeline.training.models import build_model
    model = build_model(cfg.model, export.spec)
    model = build_model(cfg.model, export.spec, stats=(mean, std))   # transform.normalize=true

Inputs arrive as stored (any dtype). The first layer (``Input``) turns them into the values the model
trains on: float samples as they are; uint8 codes k into ``float32(k) / float32(spec.divisor)`` (255
unless the export's manifest records another divisor) -- a true division, bit for bit the values
float storage holds (pipeline/data/quantize.py) -- then, with ``stats``, ``(x - mean) / std`` per
channel (the last axis of [H, W, C] samples, one figure for other shapes). Being part of the model,
the mapping and the normalisation apply to training, validation, the plots and the logged model alike.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config.schema import MODEL_NAMES


class Input(nn.Module):
    """Stored samples -> model values: uint8 codes divided by the export's divisor, then normalised."""

    def __init__(self, dtype: str, divisor: float | None = None, stats=None) -> None:
        super().__init__()
        self.codes = dtype == "uint8"
        if self.codes:  # a 0-dim tensor on the model's device: a true division there, never a reciprocal
            d = torch.tensor(255.0 if divisor is None else float(divisor), dtype=torch.float32)
            self.register_buffer("divisor", d, persistent=False)
        self.normalize = stats is not None
        if self.normalize:
            mean, std = (torch.as_tensor(v, dtype=torch.float32) for v in stats)
            self.register_buffer("mean", mean, persistent=False)
            self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.div(x.float(), self.divisor) if self.codes else x.float()
        return (x - self.mean) / self.std if self.normalize else x


class MLP(nn.Module):
    def __init__(self, shape, num_classes: int, hidden, dropout: float, input: Input) -> None:
        super().__init__()
        layers: list[nn.Module] = [input, nn.Flatten()]
        width = math.prod(shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Conv-ReLU-MaxPool blocks, global average pooling, then a small classifier head."""

    def __init__(self, shape, num_classes: int, channels, hidden: int, dropout: float, input: Input):
        super().__init__()
        if len(shape) not in (2, 3):
            raise ValueError(f"model=cnn needs samples of [H, W] or [H, W, C], got {list(shape)}")
        self.channels_last = len(shape) == 3
        self.input = input
        in_ch = shape[2] if self.channels_last else 1
        blocks: list[nn.Module] = []
        for ch in channels:
            blocks += [
                nn.Conv2d(in_ch, ch, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            in_ch = ch
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(in_ch, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input(x)
        x = x.permute(0, 3, 1, 2) if self.channels_last else x.unsqueeze(1)
        return self.head(self.features(x))


def input_stats(model: nn.Module):
    """The (mean, std) lists a model normalises its inputs with, or None."""
    for m in model.modules():
        if isinstance(m, Input) and m.normalize:
            return m.mean.tolist(), m.std.tolist()
    return None


def build_model(cfg, spec, stats=None) -> nn.Module:
    """``stats``: (mean, std) per channel, from pipeline.training.transforms.train_stats, or None."""
    inp = Input(spec.dtype, spec.divisor, stats)
    if cfg.name == "mlp":
        return MLP(spec.shape, spec.num_classes, list(cfg.hidden), cfg.dropout, inp)
    if cfg.name == "cnn":
        return CNN(spec.shape, spec.num_classes, list(cfg.channels), cfg.hidden, cfg.dropout, inp)
    raise ValueError(f"Unknown model {cfg.name!r}; valid: {list(MODEL_NAMES)}")
