"""A loader worker that dies mid-epoch (killed, out of memory) stops the job with ``WorkerDied``.

    from pipeline.training.workers import WorkerDied, worker_deaths_explained
    with worker_deaths_explained():      # pipeline/job.py wraps the stages in it
        ...                              # a dead worker, however reported -> WorkerDied

The project's own loader workers (pipeline/training/handoff/pool.py, every storage format's batches) raise
``WorkerDied`` themselves, naming the worker, its pid and the signal, as soon as the main process waits for
a batch of a worker that is gone. A plain torch Dataset is read by torch's DataLoader, whose detection is
torch's own: its SIGCHLD handler raises ``RuntimeError("DataLoader worker (pid N) is killed by signal:
...")`` in the main thread, and a loader waiting for a dead worker's batch raises ``RuntimeError(
"DataLoader worker (pid(s) N) exited unexpectedly")`` within 5 s. The signal may land inside a library that
wraps the error in its own type (MLflow's database session does); so at the job boundary an exception whose
cause/context chain holds torch's worker error becomes a ``WorkerDied`` that keeps torch's message (the
worker's pid) and says what to do. A worker killed with batches still queued makes reading them fail first
(``ConnectionResetError`` while fetching its shared memory, or ``EOFError``), before the signal arrives: for
those two the boundary waits up to ``VERDICT_WAIT_S`` for torch's error. Any other exception passes through
unchanged -- also one raised after a worker death that was handled.
"""

from __future__ import annotations

import gc
import time
import traceback
from contextlib import contextmanager

TORCH_WORKER_ERROR = "DataLoader worker (pid"  # how torch's dead-worker RuntimeErrors begin
BROKEN_HANDOVER = (ConnectionError, EOFError)  # a dead worker's queued batch can no longer be read
VERDICT_WAIT_S = 5.0  # torch's own status check interval


class WorkerDied(RuntimeError):
    """A DataLoader worker process died mid-epoch (killed, or out of memory): the run stops."""


def torch_worker_error(err: BaseException) -> RuntimeError | None:
    """torch's dead-worker RuntimeError: ``err`` itself or one it was raised from or while handling."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, RuntimeError) and str(cur).lstrip().startswith(TORCH_WORKER_ERROR):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def explain(err: BaseException) -> WorkerDied | None:
    """A WorkerDied for ``err`` when its chain holds torch's worker error, else None."""
    if isinstance(err, WorkerDied):
        return err
    found = torch_worker_error(err)
    if found is None:
        return None
    return WorkerDied(
        f"{str(found).strip()} -- a DataLoader worker process died mid-epoch, so the run stopped rather than "
        "train on an incomplete epoch. A worker killed by signal 9 (Killed) is usually the kernel's OOM "
        "killer (see `dmesg`): lower loader.num_workers, loader.batch_size or loader.prefetch_factor"
    )


def torch_verdict(err: BaseException, seconds: float = VERDICT_WAIT_S) -> BaseException:
    """Wait (main thread) for torch's SIGCHLD handler to raise its dead-worker error; return that error,
    or ``err`` when none comes within ``seconds``."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            time.sleep(0.01)
    except RuntimeError as late:
        if torch_worker_error(late) is None:
            raise
        return late
    return err


@contextmanager
def worker_deaths_explained():
    """Inside: an exception whose chain holds torch's dead-worker error leaves as a WorkerDied."""
    try:
        yield
    except Exception as err:
        found = err
        if explain(err) is None and isinstance(err, BROKEN_HANDOVER):
            found = torch_verdict(err)
        clear = explain(found)
        if clear is None or clear is err:
            raise
        # drop the frames' references to the dead loader's iterator so it shuts down now, and the
        # job's other loaders with their workers
        traceback.clear_frames(err.__traceback__)
        gc.collect()
        raise clear from found
