"""``export.engine=local``: a pool of worker processes on this machine.

A ``concurrent.futures.ProcessPoolExecutor`` of ``workers`` processes, started on the first task and kept for
the export. Processes are forked where the platform can: they start in milliseconds and share the exporting
process's memory copy-on-write (a source already in memory is not copied); what the export runs in them
(numpy, Pillow, file writes) holds no lock another thread of the parent could hold at the fork, and logging
re-creates its locks in a forked child. Elsewhere they are spawned.

Each worker asks the kernel to kill it when the process that started it dies (``PR_SET_PDEATHSIG``): an
exporting process killed with SIGKILL leaves no worker behind, holding the export's lock (a forked child
shares its file descriptors) or writing into a temp folder the next run deletes. Workers ignore SIGINT: a
Ctrl-C stops the exporting process, which stops the pool. A worker that dies (the OOM killer) fails the
export with ``EngineError`` saying so, instead of hanging.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from pipeline.data.engines import Engine, EngineError

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """In a worker: SIGKILL when ``parent`` dies (Linux), SIGINT left to the parent."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pool's own checks remain
        pass
    if os.getppid() != parent:  # it died before the call above
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


class LocalEngine(Engine):
    name = "local"
    in_process = False

    def __init__(self, workers: int, tasks_per_worker: int = 4) -> None:
        self.workers = int(workers)
        self.in_flight = self.workers * int(tasks_per_worker)
        self.pool: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(
                self.workers, mp_context=_context(), initializer=_die_with_parent, initargs=(os.getpid(),)
            )
        return self.pool

    def submit(self, fn, shared, item):
        try:
            return self._pool().submit(fn, shared, item)
        except BrokenProcessPool as err:
            raise self._broken(err) from err

    def result(self, handle):
        try:
            return handle.result()
        except BrokenProcessPool as err:
            raise self._broken(err) from err

    def _broken(self, err) -> EngineError:
        return EngineError(
            f"an export worker process died ({err}); the OOM killer is the usual cause: lower export.workers "
            "or source.chunk_size"
        )

    def cancel(self, handles) -> None:
        for handle in handles:
            handle.cancel()

    def everywhere(self, fn, *args) -> dict:
        """Workers share this machine: ``fn`` runs once, here."""
        return {"local": fn(*args)}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
