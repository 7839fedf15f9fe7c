"""In-process prefetch: a background thread prepares the next batches while the model computes.

    from pipeline.training.prefetch import ThreadPrefetcher
    batches = ThreadPrefetcher(data_loader, depth=4)   # loader.thread_prefetch=4 in the config
    for x, y in batches: ...

With cheap samples (memmap, shards) DataLoader worker processes cost more than they save: every
batch crosses a process boundary. A thread costs no copy: numpy's gathers and page-cache reads
release the GIL, so the next batches are read while torch computes. It works with 0 workers (and
with workers, in front of them). At most ``depth`` batches wait in the queue. An exception in the
thread is raised in the consumer; leaving the loop early stops the thread. pipeline.training.loading's
``EpochLoader`` runs its epochs through it.
"""

from __future__ import annotations

import queue
import threading

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class ThreadPrefetcher:
    def __init__(self, loader, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.loader, self.depth = loader, int(depth)

    def __iter__(self):
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in self.loader:
                    if not put(batch):
                        return
                put(_DONE)
            except BaseException as exc:  # handed to the consumer, raised there
                put(_Failure(exc))

        thread = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            stop.set()
            thread.join()
