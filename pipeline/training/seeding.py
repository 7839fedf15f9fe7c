"""Seeds, deterministic settings and the RNG state a checkpoint carries.

    from pipeline.training.seeding import seed_everything, capture_rng, restore_rng
    seed_everything(cfg.trainer.seed, deterministic=True)   # torch, numpy, random; deterministic torch
    state = capture_rng({"train": train_loader.generator})  # tensors + plain types (weights_only loads)
    restore_rng(state, {"train": train_loader.generator})

Epoch orders are the samplers' (pipeline/data/sampling.py: a function of (seed, epoch) only; a loader's
``set_epoch`` replays one); seeds derived from the run's seed: pipeline/seeds.py.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed torch (CPU and CUDA), numpy and ``random``; with ``deterministic`` ask torch for
    deterministic kernels (warning, not failing, on an op that has none)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False


def capture_rng(generators: dict[str, torch.Generator | None]) -> dict:
    """Every RNG state a training step can touch, as tensors and plain types."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "generators": {name: g.get_state() for name, g in generators.items() if g is not None},
    }


def restore_rng(state: dict, generators: dict[str, torch.Generator | None]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    for name, g in generators.items():
        if g is not None and name in state["generators"]:
            g.set_state(state["generators"][name])
