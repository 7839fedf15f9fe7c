"""Batches that cross from DataLoader workers to the main process without a new shared-memory segment each.

    rings = SlotRings(workers=2, slots=4, shape=(62, 47), dtype="float32", batch_size=64)   # before the
    slot = rings.acquire(worker, timeout_s)            # a worker: a free slot of its ring, or None
    x, y = rings.arrays(worker, slot, n)               # numpy views: the worker assembles the batch there
    token = rings.publish(worker, slot, n)             # what the worker returns through torch's queue
    x_t, y_t = rings.take(token)                       # the main process: tensors viewing the slot, no copy

**Why.** torch's DataLoader hands every batch a worker returns to the main process in a new shared-memory
segment (create, size, map, send its descriptor, map again, unmap): milliseconds per batch, more than a
batch of fixed-size samples costs to read. Here each worker has a ring of ``slots`` batch-sized slots in
one shared-memory block allocated once, before the workers start (and page-locked once when training on
CUDA, so copies to the GPU are asynchronous DMA with no pinning copy); a batch crosses as a few integers.

**Ownership.** A slot's state (shared, one cell per slot) is FREE, FILLING (the worker writes it) or HANDED
(its tensors are out in the main process); each transition is made by the state's owner alone, so no lock
is needed. The main process's tensors are views of the slot through one fresh numpy array per batch; the
slot returns to FREE only when that array is garbage -- every tensor and view of the batch is gone (and,
on CUDA, the copies from it have completed: a CUDA event recorded at that moment is waited for). So user
code may keep a batch as long as it likes: memory a worker may overwrite is never handed out while
referenced. A worker that finds no free slot within ``timeout_s`` (the training loop is keeping batches)
does not wait longer: it returns that batch the stock way (a fresh segment), which costs only that batch.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

FREE, FILLING, HANDED = 0, 1, 2
ALIGN = 64


@dataclass(frozen=True)
class Token:
    """A batch in slot ``slot`` of worker ``worker``'s ring, ``n`` samples."""

    worker: int
    slot: int
    n: int


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class SlotRings:
    """``workers`` rings of ``slots`` slots, each one batch of ``batch_size`` samples of ``shape``/``dtype``
    plus its int64 labels, in shared memory (module docstring)."""

    def __init__(self, workers: int, slots: int, shape, dtype, batch_size: int) -> None:
        import torch

        self.workers, self.slots, self.batch_size = int(workers), int(slots), int(batch_size)
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        self.sample_elems = int(np.prod(self.shape, dtype=np.int64))
        self.sample_bytes = self.sample_elems * self.dtype.itemsize
        self.x_bytes = _align(self.batch_size * self.sample_bytes)
        self.slot_bytes = self.x_bytes + _align(self.batch_size * 8)
        n = self.workers * self.slots
        self.memory = torch.empty(n * self.slot_bytes, dtype=torch.uint8).share_memory_()
        self.state_tensor = torch.zeros(n, dtype=torch.int32).share_memory_()
        self.torch_dtype = torch.from_numpy(np.empty(0, dtype=self.dtype)).dtype
        self.pinned = False
        self._views()

    def _views(self) -> None:
        self.buffer = self.memory.numpy()
        self.state = self.state_tensor.numpy()
        self._pending: list = []  # (cuda event, index): slots freed once their copies completed
        self._fallbacks = 0
        self.held: set[int] = set()  # slots whose tensors are out in this process

    def __getstate__(self) -> dict:  # to spawned workers: the tensors (shared by torch's reductions)
        return {k: v for k, v in self.__dict__.items() if k not in ("buffer", "state", "_pending", "held")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._views()

    @property
    def nbytes(self) -> int:
        return int(self.memory.numel())

    def index(self, worker: int, slot: int) -> int:
        return worker * self.slots + slot

    # ---- the worker's side ----

    def acquire(self, worker: int, timeout_s: float) -> int | None:
        """A FREE slot of ``worker``'s ring, now FILLING; None when none frees within ``timeout_s``."""
        base = worker * self.slots
        deadline, pause = None, 0.0002
        while True:
            free = np.flatnonzero(self.state[base : base + self.slots] == FREE)
            if len(free):
                slot = int(free[0])
                self.state[base + slot] = FILLING
                return slot
            now = time.monotonic()
            deadline = deadline if deadline is not None else now + timeout_s
            if now >= deadline:
                return None
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def arrays(self, worker: int, slot: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Numpy views of a slot: ``n`` samples and ``n`` labels."""
        off = self.index(worker, slot) * self.slot_bytes
        x = self.buffer[off : off + self.x_bytes].view(self.dtype)[: n * self.sample_elems]
        y = self.buffer[off + self.x_bytes : off + self.slot_bytes].view(np.int64)[:n]
        return x.reshape(n, *self.shape), y

    def publish(self, worker: int, slot: int, n: int) -> Token:
        self.state[self.index(worker, slot)] = HANDED
        return Token(worker, slot, n)

    def abandon(self, worker: int, slot: int) -> None:
        """The worker failed to fill the slot: it is FREE again."""
        self.state[self.index(worker, slot)] = FREE

    # ---- the main process's side ----

    def take(self, token: Token):
        """``(x, y)`` tensors viewing the token's slot; the slot is FREE again once both are garbage."""
        return self.take_slot(token.worker, token.slot, token.n)

    def take_slot(self, worker: int, slot: int, n: int):
        """``(x, y)`` tensors viewing slot ``slot`` of ``worker``'s ring (``n`` samples); the slot is FREE
        again once both are garbage."""
        import torch

        self._poll()
        index = self.index(worker, slot)
        self.held.add(index)
        off = index * self.slot_bytes
        # a new array object per batch, owned by one torch storage that every view of the batch shares (a
        # numpy view would reference the shared block itself, not this array): garbage with the last view
        base = np.ndarray((self.slot_bytes,), dtype=np.uint8, buffer=self.buffer, offset=off)
        weakref.finalize(base, self._release, index)
        raw = torch.from_numpy(base)
        x = raw[: n * self.sample_bytes].view(self.torch_dtype).view(n, *self.shape)
        y = raw[self.x_bytes : self.x_bytes + 8 * n].view(torch.int64)
        return x, y

    def reset(self) -> None:
        """Every slot this process does not hold FREE (called with no worker running: a new pool)."""
        for index in range(len(self.state)):
            if index not in self.held:
                self.state[index] = FREE

    def _release(self, index: int) -> None:
        if self.pinned:
            import torch

            event = torch.cuda.Event()
            event.record()  # after every copy from this slot queued so far
            self._pending.append((event, index))
            self._poll()
            return
        self.held.discard(index)
        self.state[index] = FREE

    def _poll(self) -> None:
        if not self._pending:
            return
        still = []
        for event, index in self._pending:
            if event.query():
                self.held.discard(index)
                self.state[index] = FREE
            else:
                still.append((event, index))
        self._pending = still

    def note_fallback(self) -> None:
        """A worker returned a batch the stock way (no free slot): said once."""
        self._fallbacks += 1
        if self._fallbacks == 1:
            log.warning(
                "loader: a worker found every slot of its ring in use (the training loop keeps earlier "
                "batches alive), so that batch crossed in a new shared-memory segment; the ring has %d slots "
                "per worker (loader.prefetch_factor + loader.thread_prefetch + 2)",
                self.slots,
            )

    def pin(self) -> bool:
        """Page-lock the block once (CUDA only), so ``x.to(cuda, non_blocking=True)`` is asynchronous DMA.
        Returns whether it is pinned."""
        import torch

        if self.pinned or not torch.cuda.is_available():
            return self.pinned
        err = torch.cuda.cudart().cudaHostRegister(self.memory.data_ptr(), self.nbytes, 0)
        self.pinned = int(err) == 0  # cudaSuccess
        if not self.pinned:
            log.warning("loader: could not page-lock the batch slots (cudaHostRegister error %s)", err)
        return self.pinned

    def close(self) -> None:
        """Unpin (the memory itself goes with the last reference)."""
        if self.pinned:
            import torch

            torch.cuda.synchronize()
            for _, index in self._pending:
                self.held.discard(index)
                self.state[index] = FREE
            self._pending = []
            torch.cuda.cudart().cudaHostUnregister(self.memory.data_ptr())
            self.pinned = False
