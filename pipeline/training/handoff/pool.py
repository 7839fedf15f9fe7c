"""Loader worker processes of the project's own: each assembles its batches straight into its ring's slots.

    pool = WorkerPool(assembler, rings, sampler, workers=2, prefetch=2, context="fork")
    for x, y in pool.run(epoch, base_seed):      # the epoch's batches, in the sampler's order
        ...
    pool.close()

**Why not torch's DataLoader workers.** Its machinery costs the main process tens to hundreds of
microseconds per batch whatever the batch holds (a profiler range, queue feeder threads, a lock, a pickled
index per batch): more than a 64-sample batch of fixed-size samples costs to read, so no worker count could
beat reading in the main process (figures: docs/parallel-loading.md). Here, per batch, the main process
waits on one semaphore, reads one integer from shared memory and returns one credit.

**Who decides what a batch holds.** Batch i of an epoch is worker i mod W's. A sampler that only computes
(``replicable``: every one but shards' memory buffers, whose reader thread lives in the main process) is
replayed by each worker for its own batches (``sampler.for_worker(w, W)``): no request crosses at all. A
sampler that reads stays in the main process, which sends each request to its worker over a pipe (a few
hundred bytes: positions and buffer offsets, never records). Either way a batch is what the sampler's
(seed, epoch) makes it, assembled by the same code in any process (assemble.py): the batches are bitwise
those of 0 workers.

**Flow.** Worker w may run ``prefetch`` batches ahead of the main process (credits: a semaphore the main
process releases as it takes w's batches). A finished batch's slot number goes into w's mailbox (shared
memory) and w's ``ready`` semaphore is released; the main process takes batches in order. When w's ring has
no free slot for ``timeout_s`` (the training loop keeps batches), or w fails, the batch, or the error with
its traceback, comes over the pipe instead and the mailbox says so.

**Faults.** A worker's exception is raised in the main process (the worker's own exception object, its
traceback in the message); a worker that dies (killed, OOM) raises ``WorkerDied`` naming the worker, its pid
and the signal, within ``POLL_S`` of the main process waiting for it. Workers ignore SIGINT (the main
process decides), and leave when their pipe closes (the main process ended or closed the pool). A pass the
consumer leaves early ends the workers; the next pass starts new ones.
"""

from __future__ import annotations

import atexit
import logging
import pickle
import signal
import traceback
import weakref
from multiprocessing.connection import wait

import numpy as np

from pipeline.training.handoff.assemble import Assembler
from pipeline.training.handoff.slots import SlotRings

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often a wait for a batch also checks that the worker is alive
BY_PIPE, FAILED = -1, -2  # mailbox entries other than a slot number


_POOLS: weakref.WeakSet = weakref.WeakSet()  # every pool of this process with workers running


def close_all() -> None:
    """End every loader worker process of this process (at exit; a test's teardown)."""
    for pool in list(_POOLS):
        pool.close()


atexit.register(close_all)


class WorkerError(RuntimeError):
    """The traceback of an exception raised in a loader worker (the ``__cause__`` of the re-raised one)."""


def _worker_main(
    w: int, conn, channel, assembler: Assembler, rings: SlotRings, sampler, timeout_s: float
) -> None:
    import random

    import torch

    from pipeline.data.storage.base import set_reader

    ready, credit, mailbox = channel
    mailbox = mailbox.numpy()  # a shared tensor: spawned workers get it through torch's pickling
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    set_reader(w + 1)
    depth = mailbox.shape[1]
    done = 0  # batches this worker has finished (its mailbox position)

    def finish(request) -> None:
        nonlocal done
        n = len(request)
        entry, message = FAILED, None
        try:
            slot = rings.acquire(w, timeout_s)
            if slot is None:  # the training loop keeps batches: this one crosses the stock way
                x, y = assembler.empty(n)
                assembler.fill(request, x, y)
                entry, message = BY_PIPE, ("batch", (torch.from_numpy(x), torch.from_numpy(y)))
            else:
                try:
                    x, y = rings.arrays(w, slot, n)
                    assembler.fill(request, x, y)
                except BaseException:
                    rings.abandon(w, slot)
                    raise
                rings.publish(w, slot, n)
                entry = slot
        except Exception as err:  # reported to the main process, which raises it
            text = traceback.format_exc()
            try:
                pickle.dumps(err)
            except Exception:
                err = None
            message = ("error", (err, text))
        if message is not None:
            conn.send(message)
        mailbox[0, done % depth] = len(request) if entry >= 0 else 0
        mailbox[1, done % depth] = entry
        done += 1
        ready.release()

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the main process is gone
            return
        if msg is None:
            return
        kind, payload = msg
        if kind == "request":  # a sampler that reads: the main process sends each batch
            finish(payload)
        elif kind == "epoch":  # a sampler this worker replays for its own batches
            epoch, seed = payload
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            for request in sampler.batches(epoch):
                credit.acquire()
                finish(request)
        elif kind == "seed":
            torch.manual_seed(payload)
            np.random.seed(payload % 2**32)
            random.seed(payload)


def _signal_name(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by signal: {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class WorkerPool:
    """``workers`` processes that assemble ``sampler``'s batches into ``rings`` (module docstring)."""

    def __init__(
        self,
        assembler: Assembler,
        rings: SlotRings,
        sampler,
        workers: int,
        prefetch: int = 2,
        context: str | None = None,
        timeout_s: float = 0.1,
    ) -> None:
        self.assembler, self.rings, self.sampler = assembler, rings, sampler
        self.workers, self.prefetch = int(workers), max(1, int(prefetch))
        self.context, self.timeout_s = context, float(timeout_s)
        self.replicated = bool(sampler.replicable)
        self.procs: list = []
        self.conns: list = []
        self.ready: list = []
        self.credit: list = []
        self.mailboxes: list = []
        self.taken: list[int] = []  # batches taken from each worker since it started (its mailbox position)

    @property
    def started(self) -> bool:
        return bool(self.procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self) -> None:
        import multiprocessing as mp

        import torch

        ctx = mp.get_context(self.context)
        self.rings.reset()  # the slots no batch of this process still holds (earlier workers have ended)
        depth = self.prefetch + 1
        for w in range(self.workers):
            here, there = ctx.Pipe(duplex=True)
            ready, credit = ctx.Semaphore(0), ctx.Semaphore(0)
            mailbox = torch.zeros((2, depth), dtype=torch.int64).share_memory_()
            mine = self.sampler.for_worker(w, self.workers) if self.replicated else None
            proc = ctx.Process(
                target=_worker_main,
                args=(
                    w,
                    there,
                    (ready, credit, mailbox),
                    self.assembler,
                    self.rings,
                    mine,
                    self.timeout_s,
                ),
                name=f"loader-worker-{w}",
                daemon=True,
            )
            proc.start()
            there.close()
            self.procs.append(proc)
            self.conns.append(here)
            self.ready.append(ready)
            self.credit.append(credit)
            self.mailboxes.append(mailbox.numpy())
            self.taken.append(0)
        _POOLS.add(self)

    def _died(self, w: int):
        from pipeline.training.workers import WorkerDied

        proc = self.procs[w]
        proc.join(timeout=1)
        return WorkerDied(
            f"loader worker {w} (pid {proc.pid}) {_signal_name(proc.exitcode)} -- a loader worker "
            "process died mid-epoch, so the run stopped rather than train on an incomplete epoch. "
            "Killed by signal SIGKILL is usually the kernel's OOM killer (see `dmesg`): lower "
            "loader.num_workers, loader.batch_size or loader.prefetch_factor"
        )

    def _send(self, w: int, message) -> None:
        try:
            self.conns[w].send(message)
        except (BrokenPipeError, ConnectionResetError):
            raise self._died(w) from None

    def _wait(self, w: int) -> None:
        """Until worker ``w`` has finished its next batch; WorkerDied when it died instead."""
        proc = self.procs[w]
        while not self.ready[w].acquire(timeout=POLL_S):
            if not proc.is_alive():
                raise self._died(w)

    def _message(self, w: int):
        conn, proc = self.conns[w], self.procs[w]
        if not wait([conn, proc.sentinel], timeout=10) or not conn.poll():
            raise RuntimeError(f"loader worker {w} (pid {proc.pid}) said a message was coming and sent none")
        return conn.recv()

    def run(self, epoch: int, base_seed: int):
        """The epoch's batches in order: ``(x, y)`` tensors."""
        if not self.started:
            self.start()
        W, depth = self.workers, self.prefetch + 1
        taken = self.taken
        total = len(self.sampler)
        finished = False
        try:
            granted = [0] * W
            mine = [len(range(w, total, W)) for w in range(W)]  # each worker's batches this epoch
            if self.replicated:
                for w in range(W):
                    self._send(w, ("epoch", (epoch, int(base_seed) + w)))
                    for _ in range(min(self.prefetch, mine[w])):
                        self.credit[w].release()
                        granted[w] += 1
                requests = None
            else:
                for w in range(W):
                    self._send(w, ("seed", int(base_seed) + w))
                requests = iter(self.sampler)
                sent = 0
            for i in range(total):
                if requests is not None:  # keep each worker ``prefetch`` requests ahead
                    while sent < total and sent < i + W * self.prefetch:
                        request = next(requests)
                        self._send(sent % W, ("request", request))
                        sent += 1
                w = i % W
                self._wait(w)
                k = taken[w] % depth
                n, entry = int(self.mailboxes[w][0, k]), int(self.mailboxes[w][1, k])
                taken[w] += 1
                if entry >= 0:
                    batch = self.rings.take_slot(w, entry, n)
                else:
                    kind, payload = self._message(w)
                    if kind == "error":
                        err, text = payload
                        cause = WorkerError(f"in loader worker {w}:\n{text}")
                        raise (err if err is not None else RuntimeError(text)) from cause
                    self.rings.note_fallback()
                    batch = payload
                if self.replicated and granted[w] < mine[w]:
                    self.credit[w].release()  # w may start another batch
                    granted[w] += 1
                yield batch
            if requests is not None:
                for _ in requests:  # a reading sampler: let it finish its epoch (nothing is left)
                    pass
            finished = True
        finally:
            if not finished:  # left early: the workers may be mid-batch; the next pass starts new ones
                self.close()

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns, self.ready, self.credit, self.mailboxes, self.taken = [], [], [], [], [], []
        _POOLS.discard(self)
