"""``export.engine=dask``: the export's pieces as Dask futures, on a cluster the export joins or starts.

    export.engine=dask                                  # a LocalCluster for this export, then stopped
    export.engine=dask export.address=tcp://head:8786   # a running scheduler (dask scheduler / dask worker)

Without ``export.address`` the export starts a ``distributed.LocalCluster`` of ``export.workers``
single-threaded worker processes (processes: the work is Python that holds the GIL), with the scheduler,
the workers and the scheduler's HTTP endpoint bound to 127.0.0.1 on free ports (no dashboard open to the
network), and closes it when the export ends, however it ends. With an address it joins that cluster and
uses all its worker threads (``export.workers`` is not used); the cluster outlives the export.

The shared context of a ``map`` (the source's config, the format's ``PartWriter``) is scattered to every
worker once (``Client.scatter(broadcast=True)``), each piece is one ``Client.submit`` (``pure=False``: a
piece is work to do, never a cached value), and results come back in order through ``Engine.map``. Tasks
write their files themselves, into the export's temp folder: the workers must see it at the same path (a
shared file system on a real cluster; ``everywhere`` lets the export check it and sync what each wrote).

A local cluster's workers are spawned (Dask's default), so they share nothing with the exporting process, not
even its export lock; Python starts its multiprocessing resource tracker for them, a small process that stays
a child of the exporting process until it exits (a job's memory figures count it among the processes).
"""

from __future__ import annotations

import logging

from pipeline.data.engines import Engine, EngineError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30


class DaskEngine(Engine):
    name = "dask"
    in_process = False
    remote = True  # a scheduler's workers may run anywhere: the export checks and syncs its folder on each

    def __init__(self, workers: int, address: str | None = None, tasks_per_worker: int = 4) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError as err:
            raise EngineError(
                f"export.engine=dask needs Dask distributed ({err}): pip install 'dask[distributed]'"
            ) from err
        self.address, self.cluster, self.client = address, None, None
        try:
            if address:
                self.client = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
            else:
                logging.getLogger("distributed").setLevel(logging.WARNING)  # a private cluster's chatter
                self.cluster = LocalCluster(
                    n_workers=int(workers),
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    scheduler_port=0,
                    dashboard_address="127.0.0.1:0",  # the scheduler's HTTP endpoint: local, a free port
                    worker_dashboard_address=None,
                    silence_logs=logging.WARNING,
                )
                self.client = Client(self.cluster, set_as_default=False)
        except OSError as err:  # distributed raises OSError (TimeoutError) for an unreachable scheduler
            self.close()
            where = f"the Dask scheduler at export.address={address}" if address else "a local Dask cluster"
            raise EngineError(f"cannot reach {where}: {err}") from err
        except BaseException:
            self.close()
            raise
        self.workers = max(1, sum(self.client.nthreads().values()))
        if address and not self.client.nthreads():
            self.close()
            raise EngineError(f"the Dask scheduler at export.address={address} has no workers")
        self.in_flight = self.workers * int(tasks_per_worker)
        log.info(
            "export: Dask %s, %d worker threads",
            f"cluster at {address}" if address else f"local cluster {self.client.scheduler.address}",
            self.workers,
        )

    def prepare(self, shared):
        return self.client.scatter(shared, broadcast=True, hash=False) if shared is not None else None

    def submit(self, fn, shared, item):
        return self.client.submit(fn, shared, item, pure=False)

    def result(self, handle):
        return handle.result()

    def cancel(self, handles) -> None:
        self.client.cancel(handles)

    def everywhere(self, fn, *args) -> dict:
        return self.client.run(fn, *args)

    def describe(self) -> str:
        where = f"the cluster at {self.address}" if self.address else "a local cluster"
        return f"{self.workers} Dask worker threads on {where}"

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
