"""A Hydra multirun as one MLflow parent run with a child run per job, and its report at the end.

    pipeline -m loader.batch_size=32,64      # conf/hydra/default.yaml wires SweepCallback in

``SweepCallback`` creates the store, the experiment and the parent run once, in the launching process,
before any job starts -- a brand-new SQLite store hit by several jobs at once breaks during schema
creation -- and hands the parent's id to the jobs through the file ``<sweep dir>/.mlflow_parent_run_id``
(read by ``sweep_parent_run_id()``, so it reaches jobs of any launcher: basic, joblib, submitit local
or SLURM) and the environment variable ``PIPELINE_MLFLOW_PARENT_RUN_ID``. When the multirun ends (or,
after a failed job, at exit) it writes the sweep report (pipeline/tracking/sweep_report.py) to
``<sweep dir>/report/``, logs it to the parent run and prints the table; its options live in
conf/hydra/default.yaml (``report``, ``rank_by``: a metric of pipeline/metrics.py with a direction,
checked when Hydra builds the callback, so a bad one fails before any job runs). The report's table,
best configuration on top, is also the parent run's description (``mlflow.note.content``), shown on
its page in the MLflow UI.

Like a job, the sweep ends the runs dead processes left RUNNING before it starts (reaper.py) and keeps
a heartbeat on its parent run while it runs (heartbeat.py). The parent is tagged ``sweep.varied``:
the keys the sweep varies (``a=1,2``-style overrides and ``hydra.sweeper.params``); each child is named
by its values of those keys, e.g. ``bs=64 workers=2 storage=memmap`` (``child_run_name``), unless
``tracking.run_name`` is set.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline import fsio
from pipeline.tracking.store import client_for, prepare_store, ui_url

log = logging.getLogger(__name__)

PARENT_ENV = "PIPELINE_MLFLOW_PARENT_RUN_ID"
PARENT_FILE = ".mlflow_parent_run_id"
VARIED_TAG = "sweep.varied"
SHORT_KEYS = {"loader.batch_size": "bs", "loader.num_workers": "workers"}  # child names
NAME_VALUE_MAX = 40


def varied_keys(config: DictConfig) -> list[str]:
    """The keys a multirun varies: its sweep overrides (``a=1,2``, ``range(..)``, ``glob(..)``...) and
    the keys of ``hydra.sweeper.params`` (optuna's search space, the basic sweeper's params)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = [
        o.key_or_group
        for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        if o.is_sweep_override()
    ]
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    keys += [str(k) for k in params if str(k) not in keys]
    return keys


def short_names(keys: list[str]) -> dict[str, str]:
    """``loader.batch_size`` -> ``bs``, ``loader.num_workers`` -> ``workers``, else the last part of the
    key unless two keys share it (then the whole key)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: SHORT_KEYS.get(k) or (tail if last.count(tail) == 1 else k) for k, tail in zip(keys, last)}


def child_run_name(cfg: DictConfig, parent_run_id: str, overrides: str) -> str | None:
    """A sweep child's run name: its values of the keys the sweep varies, e.g. ``bs=64 workers=2``;
    None when ``tracking.run_name`` is set or the sweep varies nothing this job overrides."""
    from pipeline.tracking.sweep_report import parse_overrides

    if cfg.tracking.run_name:
        return None
    try:
        varied = client_for(cfg.tracking.uri).get_run(parent_run_id).data.tags.get(VARIED_TAG, "").split()
    except Exception as err:  # the name is a convenience: never fail a job for it
        log.warning("sweep parent %s unreadable (%s): default run name", parent_run_id, err)
        return None
    mine = parse_overrides(overrides)
    names = short_names([k for k in varied if k in mine])
    parts = [f"{short}={mine[key][:NAME_VALUE_MAX]}" for key, short in names.items()]
    return " ".join(parts) or None


def sweep_parent_run_id() -> str | None:
    """The parent run of the multirun this job belongs to, or None outside a sweep.

    The file in the sweep dir wins: it belongs to this very sweep whatever process runs the job
    (a reused loky worker or a cluster node may carry another environment).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            path = Path(str(hc.sweep.dir)) / PARENT_FILE
            if path.is_file():
                return path.read_text().strip() or None
    return os.environ.get(PARENT_ENV) or None


class SweepCallback(Callback):
    """Parent MLflow run for a Hydra multirun; its jobs become its children; a report at the end."""

    def __init__(self, report: bool = True, rank_by: str = "perf/train_samples_per_s") -> None:
        self.uri: str | None = None
        self.parent_id: str | None = None
        if report:
            from pipeline.metrics import rankable

            rankable(rank_by)  # a name the report cannot rank by fails now, not after every job has run
        self.report, self.rank_by = report, rank_by
        self.sweep_dir: Path | None = None
        self.heartbeat = None

    def __getstate__(self) -> dict:
        """Launchers that run jobs in other processes (joblib, submitit) pickle the callbacks with the
        task: the heartbeat (a thread) stays with the launcher, the jobs do not need it."""
        return {**self.__dict__, "heartbeat": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        from pipeline.tracking.heartbeat import Heartbeat, process_tags
        from pipeline.tracking.reaper import reap_quietly

        HydraConfig.instance().set_config(config)
        self.uri = config.tracking.uri
        exp_id = prepare_store(self.uri, config.tracking.experiment, config.tracking.artifact_location)
        if config.tracking.reap:
            reap_quietly(self.uri, exp_id, config.tracking.stale_after_s)
        overrides = " ".join(config.hydra.overrides.task)
        name = config.tracking.run_name or f"sweep {time.strftime('%Y-%m-%d %H:%M:%S')}"
        run = client_for(self.uri).create_run(
            exp_id,
            run_name=name,
            tags={
                "pipeline.role": "sweep",
                "hydra.overrides": overrides,
                "hydra.sweep_dir": str(config.hydra.sweep.dir),
                VARIED_TAG: " ".join(varied_keys(config)),
                **process_tags(config.tracking.heartbeat_s),  # the launcher's: the reaper judges it
            },
        )
        self.parent_id = run.info.run_id
        self.heartbeat = Heartbeat(self.uri, self.parent_id, config.tracking.heartbeat_s).start()
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        fsio.atomic_write(self.sweep_dir / PARENT_FILE, self.parent_id + "\n")
        os.environ[PARENT_ENV] = self.parent_id
        atexit.register(self._finish)  # a failing job skips on_multirun_end
        log.info("MLflow: sweep parent run %s in %s", self.parent_id, self.uri)
        if ui_url(self.uri, exp_id):
            log.info(
                "MLflow UI: %s (the sweep: %s)",
                ui_url(self.uri, exp_id),
                ui_url(self.uri, exp_id, self.parent_id),
            )

    def _finish(self, aborted: bool = True) -> None:
        """End the parent: FAILED when the sweep was aborted (a job raised, perhaps before its run
        existed) or any child did not finish; FINISHED otherwise."""
        if self.parent_id is None:
            return
        if self.report:
            self._report()
        client = client_for(self.uri)
        children = client.search_runs(
            [client.get_run(self.parent_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}'",
        )
        ok = not aborted and children and all(r.info.status == "FINISHED" for r in children)
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        client.set_terminated(self.parent_id, status="FINISHED" if ok else "FAILED")
        os.environ.pop(PARENT_ENV, None)
        self.parent_id = None

    def _report(self) -> None:
        from pipeline.tracking.sweep_report import publish_report

        try:
            report = publish_report(self.uri, self.parent_id, self.sweep_dir / "report", self.rank_by)
        except Exception as err:  # the jobs' results stay in MLflow; say why the summary is missing
            log.exception("sweep report failed")
            client_for(self.uri).set_tag(self.parent_id, "sweep.report_error", f"{type(err).__name__}: {err}")
            return
        text = report.markdown()
        log.info("sweep report written to %s and logged to run %s", self.sweep_dir / "report", self.parent_id)
        print(f"\nSweep report ({len(report.rows)} runs, parent {self.parent_id}):\n{text}", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish(aborted=False)
        atexit.unregister(self._finish)
