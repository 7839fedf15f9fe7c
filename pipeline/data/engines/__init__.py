"""Engines: where the work of a parallel export runs -- this process, worker processes on this machine, or a
Dask cluster -- behind one small interface (``Engine``).

    from pipeline.data.engines import open_engine
    with open_engine(cfg.export) as engine:           # export.engine, export.workers, export.address
        engine.workers, engine.in_process             # 2, False
        for result in engine.map(fn, items, shared):  # fn(shared, item), results in the items' order
            ...
        engine.everywhere(fn, *args)                  # fn(*args) once in every worker process
        engine.remote                                 # workers may be on other machines (dask)

``map`` keeps at most ``workers x export.tasks_per_worker`` tasks in flight and hands results back in order,
so memory holds a bounded number of pieces whatever the data's size, and the caller consumes them in sample
order. ``fn`` and ``shared`` must be picklable (module-level functions, plain objects): they travel to the
workers (``shared`` once per worker where the engine can, else with each task). An exception in a task is
raised by ``map`` in the caller, as it was raised in the worker (a file named in it stays named).

The engines:

- ``serial`` (``export.workers=1``, ``engine=local``): ``map`` runs in this process -- the serial export.
- ``local`` (``local.py``): a process pool of ``export.workers`` processes (``auto``: the CPUs this process
  may use, pipeline/system/cpus.py), forked where the platform can (fast to start; the export imports
  nothing that forking breaks), each dying with the process that started it.
- ``dask`` (``dask_cluster.py``): Dask distributed. ``export.address`` joins a running scheduler
  (``tcp://host:8786``; every worker must import this package and see the export's folder at the same
  path); without one, a ``LocalCluster`` of ``export.workers`` single-threaded worker processes is started
  for the export, bound to 127.0.0.1, and stopped after it. Chosen over Ray for fit: the export needs
  ordered futures over plain functions, which Dask's ``Client.submit`` is; Dask is a few MB of pure Python
  (Ray is a ~78 MB wheel with its own object store and daemons) and starts faster here (docs/export.md).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger(__name__)

ENGINES = ("local", "dask")
ADDRESS_SCHEMES = ("tcp://", "tls://")  # Dask's own protocols (distributed.comm)


class EngineError(RuntimeError):
    """An engine that cannot start or lost its workers; the message says which and why."""


class Engine:
    """Runs ``fn(shared, item)`` for many items, results in order (module docstring)."""

    name = "serial"
    workers = 1
    in_process = True  # True: map runs in this process (no pickling, no workers)
    remote = False  # True: workers may run on other machines (their files are checked and synced there)
    in_flight = 1

    def submit(self, fn: Callable, shared: Any, item: Any):
        """A handle on the running call (a future)."""
        raise NotImplementedError

    def result(self, handle) -> Any:
        raise NotImplementedError

    def cancel(self, handles) -> None:
        """Cancel calls not yet started (the caller stopped reading)."""

    def prepare(self, shared: Any) -> Any:
        """``shared`` as the tasks get it (Dask: scattered to every worker once)."""
        return shared

    def map(self, fn: Callable, items: Iterable, shared: Any = None) -> Iterator:
        if self.in_process:
            for item in items:
                yield fn(shared, item)
            return
        shared = self.prepare(shared)
        items = iter(items)
        pending: deque = deque()
        try:
            for item in items:
                pending.append(self.submit(fn, shared, item))
                if len(pending) >= self.in_flight:
                    break
            while pending:
                done = self.result(pending.popleft())
                for item in items:  # one more in flight before the caller consumes this one
                    pending.append(self.submit(fn, shared, item))
                    break
                yield done
        finally:
            if pending:
                self.cancel(list(pending))

    def pmap(self, fn: Callable, items: Iterable) -> Iterator:
        """``fn(item)`` for each item, in order: the ``pmap`` a source builds with."""
        return self.map(_apply, items, fn)

    def everywhere(self, fn: Callable, *args) -> dict:
        """``fn(*args)`` in every worker process; {worker: result}. Serial: in this process."""
        return {"local": fn(*args)}

    def close(self) -> None:
        pass

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        return "in this process" if self.in_process else f"{self.workers} worker processes ({self.name})"


def _apply(fn: Callable, item: Any) -> Any:
    return fn(item)


def resolve_workers(setting) -> int:
    """``export.workers``: ``auto`` = the CPUs this process may use (cgroup quota and affinity aware)."""
    if str(setting) == "auto":
        from pipeline.system.cpus import usable_cpus

        return usable_cpus()
    return int(setting)


def open_engine(export_cfg=None) -> Engine:
    """The engine ``export_cfg`` (the ``export`` config node; None: the serial one) asks for."""
    if export_cfg is None:
        return Engine()
    workers = resolve_workers(export_cfg.get("workers", "auto"))
    per_worker = int(export_cfg.get("tasks_per_worker", 4))
    engine = str(export_cfg.get("engine", "local"))
    if engine == "dask":
        from pipeline.data.engines.dask_cluster import DaskEngine

        return DaskEngine(workers, export_cfg.get("address"), per_worker)
    if workers <= 1:
        return Engine()
    from pipeline.data.engines.local import LocalEngine

    return LocalEngine(workers, per_worker)


def check_export_config(cfg) -> None:
    """The ``export`` node's rules across keys (its ranges are field constraints): an address joins a Dask
    cluster, in a form Dask reads; ``engine=dask`` needs Dask installed. ConfigError before any work."""
    import importlib.util

    from pipeline.config.checks import require

    node = cfg.get("export")
    if node is None:
        return
    engine, address = str(node.engine), node.address
    if address is not None:
        require(
            engine == "dask",
            "export.address",
            address,
            f"joins a Dask cluster: set export.engine=dask too (export.engine={engine} runs on this machine)",
        )
        require(
            isinstance(address, str)
            and address.startswith(ADDRESS_SCHEMES)
            and len(address.split("://")[1]) > 0,
            "export.address",
            address,
            "a Dask scheduler address, e.g. tcp://10.0.0.5:8786 (tcp:// or tls://); null starts a local "
            "cluster for the export",
        )
    if engine == "dask":
        require(
            importlib.util.find_spec("distributed") is not None,
            "export.engine",
            engine,
            "needs Dask distributed, which is not installed: pip install 'dask[distributed]' (or use "
            "export.engine=local)",
        )
