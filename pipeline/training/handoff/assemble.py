"""Assemble one batch into given arrays: the dataset's read, in parts on decode threads, then per-sample
transforms -- in whichever process reads the batch (the main process, or a DataLoader worker).

    from pipeline.training.handoff.assemble import Assembler
    asm = Assembler(dataset, transform=train_tf, seed=cfg.trainer.seed, threads=cfg.loader.decode_threads)
    x, y = asm.empty(len(request))            # or a slot's arrays (slots.py)
    asm.fill(request, x, y)                   # x: (n, *asm.shape) of asm.dtype; y: (n,) int64

With ``threads`` > 1, where the dataset does work per sample (``per_sample_work``: encoded, pt, npy) or a per-
sample transform runs, the batch is cut into that many contiguous parts (``request.part(a, b)``), each read
(``dataset.read_into``: copies, decodes) and transformed by one thread of a pool this process keeps: the
decoders (imagecodecs, Pillow), numpy's copies and Pillow's resize release the GIL, so the parts proceed side
by side on as many cores. ``dataset.release(request)`` follows once every part is read. A transform reads each
sample from a staging array of the stored shape (one per thread, reused) into the batch; its draws are the
sample's own (pipeline/training/transforms.py: ``uniforms``), so neither the thread count nor the worker count
changes a batch, bit for bit.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def decode_pool(threads: int) -> ThreadPoolExecutor:
    """One pool per process and size (a forked DataLoader worker makes its own)."""
    key = (os.getpid(), int(threads))
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = ThreadPoolExecutor(int(threads), thread_name_prefix="decode")
    return pool


def parts(n: int, k: int) -> list[tuple[int, int]]:
    """``n`` items cut into at most ``k`` contiguous parts of near-equal size."""
    k = max(1, min(int(k), n))
    cuts = [round(i * n / k) for i in range(k + 1)]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


class Assembler:
    """Reads a dataset's batches into arrays (module docstring)."""

    def __init__(self, dataset, transform=None, seed: int = 0, threads: int = 0) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, int(seed)
        # threads only where they share work: decoding or file reads per sample, or a per-sample transform
        share = dataset.per_sample_work or transform is not None
        self.threads = max(1, int(threads)) if share else 1
        spec = dataset.spec
        self.stored = tuple(spec.shape)
        self.shape = transform.output_shape(self.stored) if transform is not None else self.stored
        self.dtype = np.dtype(spec.dtype)
        self._stage = threading.local()

    def __getstate__(self) -> dict:  # to spawned workers: the staging arrays are per thread, per process
        state = dict(self.__dict__)
        state.pop("_stage")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._stage = threading.local()

    def empty(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.empty((n, *self.shape), dtype=self.dtype), np.empty(n, dtype=np.int64)

    def fill(self, request, x: np.ndarray, y: np.ndarray) -> None:
        """Batch ``request`` into ``x`` (samples) and ``y`` (labels)."""
        n = len(request)
        y[:] = self.dataset.labels[request.positions]
        try:
            cuts = parts(n, self.threads)
            if len(cuts) <= 1:
                self._part(request, 0, n, x)
            else:
                futures = [decode_pool(self.threads).submit(self._part, request, a, b, x) for a, b in cuts]
                for f in futures:
                    f.result()  # the first failure is raised here, after the others finished
        finally:
            self.dataset.release(request)

    def _staging(self, n: int) -> np.ndarray:
        stage = getattr(self._stage, "array", None)
        if stage is None or len(stage) < n:
            stage = self._stage.array = np.empty((n, *self.stored), dtype=self.dtype)
        return stage[:n]

    def _part(self, request, a: int, b: int, x: np.ndarray) -> None:
        sub = request if (a, b) == (0, len(request)) else request.part(a, b)
        if self.transform is None:
            self.dataset.read_into(sub, x[a:b])
            return
        stage = self._staging(b - a)
        self.dataset.read_into(sub, stage)
        from pipeline.training.transforms import uniforms

        draws = self.transform.draws
        u = uniforms(self.seed, request.epoch, self.dataset.ids[sub.positions], max(draws, 1))
        for j in range(b - a):
            self.transform.apply(stage[j], x[a + j], u[j])
