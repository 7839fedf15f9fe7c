"""Models sized from the exported data: ``mlp`` for any sample shape, ``cnn`` for [H, W] or [H, W, C].

    from pipeline.training.models import build_model
    model = build_model(cfg.model, export.spec)

Inputs arrive as stored (any dtype); the model casts them to float and scales uint8 pixels to [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config.schema import MODEL_NAMES


class _Input(nn.Module):
    def __init__(self, dtype: str) -> None:
        super().__init__()
        self.scale = 1.0 / 255.0 if dtype == "uint8" else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale


class MLP(nn.Module):
    def __init__(self, shape, num_classes: int, hidden, dropout: float, dtype: str) -> None:
        super().__init__()
        layers: list[nn.Module] = [_Input(dtype), nn.Flatten()]
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

    def __init__(self, shape, num_classes: int, channels, hidden: int, dropout: float, dtype: str):
        super().__init__()
        if len(shape) not in (2, 3):
            raise ValueError(f"model=cnn needs samples of [H, W] or [H, W, C], got {list(shape)}")
        self.channels_last = len(shape) == 3
        self.input = _Input(dtype)
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


def build_model(cfg, spec) -> nn.Module:
    if cfg.name == "mlp":
        return MLP(spec.shape, spec.num_classes, list(cfg.hidden), cfg.dropout, spec.dtype)
    if cfg.name == "cnn":
        return CNN(spec.shape, spec.num_classes, list(cfg.channels), cfg.hidden, cfg.dropout, spec.dtype)
    raise ValueError(f"Unknown model {cfg.name!r}; valid: {list(MODEL_NAMES)}")
