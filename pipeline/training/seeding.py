"""Seeds, deterministic settings, a per-epoch shuffle and the RNG state a checkpoint carries.

    from pipeline.training.seeding import seed_everything, EpochShuffle, set_epoch, capture_rng, restore_rng
    seed_everything(cfg.trainer.seed, deterministic=True)   # torch, numpy, random; deterministic torch
    sampler = EpochShuffle(len(dataset), seed)              # epoch e's order depends only on (seed, e)
    set_epoch(train_loader, 3)                              # continue a run at epoch 3
    state = capture_rng({"train": train_loader.generator})  # tensors + plain types (weights_only loads)
    restore_rng(state, {"train": train_loader.generator})

Why a sampler of our own: DataLoader's default RandomSampler draws each epoch's permutation from the
loader's generator, which the loader also draws worker seeds from -- once per epoch without
``persistent_workers`` but only once per run with them, so the order would depend on the worker
settings, and a resumed run would have to replay every earlier draw. ``EpochShuffle`` derives epoch
``e``'s permutation from ``(seed, e)`` alone: the order is the same for any ``num_workers``,
``persistent_workers`` or prefetching, and a resumed run only needs the epoch number.
"""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch
from torch.utils.data import Sampler


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


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and ``parts``; nearby inputs give unrelated streams."""
    blob = ":".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


class EpochShuffle(Sampler[int]):
    """A uniform permutation of ``range(n)`` per epoch, a function of ``(seed, epoch)`` only.

    The epoch advances by itself each time an iteration starts; ``set_epoch`` moves it.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1  # runs at the first next(), not at iter()
        generator = torch.Generator()
        generator.manual_seed(derive_seed(self.seed, "shuffle", epoch))
        yield from torch.randperm(self.n, generator=generator).tolist()


def find_epoch_sampler(loader):
    """The epoch-indexed sampler behind a DataLoader (``EpochShuffle``, also when wrapped in a batch
    sampler, or a storage format's own batch sampler): whatever has ``set_epoch``."""
    for candidate in (
        getattr(loader, "batch_sampler", None),
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "sampler", None), "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        if callable(getattr(candidate, "set_epoch", None)):  # EpochShuffle, the formats' batch samplers
            return candidate
    return None


def set_epoch(loader, epoch: int) -> None:
    """Make the loader's next pass the one of epoch ``epoch`` (no-op for an unshuffled loader)."""
    own = getattr(loader, "set_epoch", None)  # a wrapper with an epoch of its own (transforms.Augmented)
    if callable(own):
        own(epoch)
        return
    sampler = find_epoch_sampler(loader)
    if sampler is not None:
        sampler.set_epoch(epoch)


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
