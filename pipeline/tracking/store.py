"""MLflow tracking: the store and one run per job.

    from pipeline.tracking.store import prepare_store, TrackedRun
    exp_id = prepare_store(uri, "pipeline", artifact_location)
    with TrackedRun(uri, exp_id, run_name="demo") as run:
        run.log_params({"loader.batch_size": 64})
        run.log_metrics({"train/loss": 0.3}, step=0)

Everything goes through ``MlflowClient`` with an explicit run id, so no global "active run" leaks
between jobs that Hydra's basic launcher runs in one process. A run that raises ends FAILED; one
interrupted (Ctrl-C, SIGTERM) ends KILLED; never RUNNING.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from omegaconf import OmegaConf  # noqa: E402

log = logging.getLogger(__name__)

PARAM_VALUE_MAX = 6000
BATCH = 100
# MLflow 3's experiment type: the UI opens a "custom_model_development" experiment on its runs (the
# values are in the UI's ExperimentKind; "genai_development" opens on traces)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


class TrackingError(RuntimeError):
    pass


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


# While checking the store at start: one quick try, not MLflow's default retries (minutes on a dead host).
CHECK_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
}


@contextmanager
def _quick_http():
    saved = {k: os.environ.get(k) for k in CHECK_HTTP_ENV}
    os.environ.update(CHECK_HTTP_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prepare_store(uri: str, experiment: str, artifact_location: str | None = None) -> str:
    """Create the store and the experiment if needed; return the experiment id. An experiment without
    an ``mlflow.experimentKind`` tag is marked as model training (``EXPERIMENT_KIND``).

    Fails at once (seconds, even for a dead HTTP server), naming the URI, when the store cannot be
    reached or written: the check writes an experiment tag and, for local artifact folders, a file.
    """
    try:
        with _quick_http():
            if uri.startswith("sqlite:///"):
                _check_sqlite(uri[len("sqlite:///") :].split("?", 1)[0])
            exp_id = _get_or_create(uri, experiment, artifact_location)
            client = client_for(uri)
            client.set_experiment_tag(exp_id, "pipeline.store_checked", time.strftime("%Y-%m-%dT%H:%M:%S"))
            exp = client.get_experiment(exp_id)
            if EXPERIMENT_KIND[0] not in exp.tags:  # a kind chosen in the UI is kept
                client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
            _check_artifact_dir(exp.artifact_location)
            return exp_id
    except TrackingError:
        raise
    except Exception as err:
        raise TrackingError(
            f"MLflow tracking store {uri} cannot be used: {type(err).__name__}: "
            f"{str(err).strip()[:500]}. Check tracking.uri / MLFLOW_TRACKING_URI"
        ) from err


def _check_sqlite(path: str) -> None:
    """Open the DB and take a write lock, failing at once (MLflow itself retries for ~100 s)."""
    import sqlite3

    if path in ("", ":memory:"):
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=30)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute("CREATE TABLE pipeline_write_check (x INTEGER)")  # a real write, rolled back
        con.execute("ROLLBACK")
    finally:
        con.close()


def _check_artifact_dir(location: str | None) -> None:
    if not location or not location.startswith(("file:", "/")):
        return  # remote artifact stores are checked by the server when the run logs
    from urllib.parse import unquote, urlparse

    path = Path(unquote(urlparse(location).path))
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-check-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def _get_or_create(uri: str, experiment: str, artifact_location: str | None) -> str:
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if artifact_location and _is_local(uri):
            location = Path(artifact_location).resolve().as_uri()
        try:
            return client.create_experiment(experiment, artifact_location=location)
        except Exception:  # another process created it a moment ago
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {experiment!r} in {uri} is deleted; restore it or set "
            "tracking.experiment to another name"
        )
    return exp.experiment_id


def ui_url(uri: str, experiment_id: str, run_id: str | None = None) -> str | None:
    """The MLflow UI page of an experiment's runs (or of one run) on a tracking server; None for a local
    store. ``workflowType=machine_learning`` opens MLflow 3.17's UI in its model-training view: its
    GenAI / Model training switch is a per-browser setting that starts on GenAI (Overview: traces,
    token usage) whatever the experiment's kind tag says."""
    if not uri.startswith(("http://", "https://")):
        return None
    page = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{page}{'/' + run_id if run_id else ''}?workflowType=machine_learning"


def flatten(cfg: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}; lists stay one value."""
    data = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:PARAM_VALUE_MAX]
    return out


def config_differences(
    a: dict[str, str], b: dict[str, str], ignore: Callable[[str], bool] = lambda key: False
) -> list[tuple[str, str | None, str | None]]:
    """(key, value in ``a``, value in ``b``) for every key of two flattened configs whose values differ
    (None where a side lacks the key), sorted by key, the keys ``ignore`` names left out."""
    keys = sorted(k for k in set(a) | set(b) if not ignore(k))
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


class TrackedRun:
    """One MLflow run; a context manager that always ends it with the right status."""

    def __init__(
        self,
        uri: str,
        experiment_id: str,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.uri, self.experiment_id, self.run_name = uri, experiment_id, run_name
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.client = client_for(uri)
        self.run_id: str | None = None

    def start(self) -> "TrackedRun":
        tags = dict(self.tags)
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        return self

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> "TrackedRun":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
            return
        interrupted = issubclass(exc_type, (KeyboardInterrupt, SystemExit))
        try:
            self.set_tags({"error": f"{exc_type.__name__}: {exc}"[:5000]})
        finally:
            self.end("KILLED" if interrupted else "FAILED")

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:PARAM_VALUE_MAX]) for k, v in params.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
