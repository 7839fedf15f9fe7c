"""A real ``mlflow server`` for tests, on 127.0.0.1, stopped with its whole process group.

    with serve(tmp_path / "server") as url:      # http://127.0.0.1:<free port>
        ...

(tests/conftest.py wraps it as the ``mlflow_server`` fixture.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(store: Path, start_timeout: float = 180, template: Path | None = None):
    """``mlflow server`` with a SQLite backend and an artifact folder under ``store``; yields its URL.
    ``template``: an empty migrated store to start from (conftest.py's ``mlflow_template``)."""
    store.mkdir(parents=True, exist_ok=True)
    if template is not None:
        shutil.copyfile(template, store / "mlflow.db")
    port = free_port()
    log = open(store / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{store}/mlflow.db",
            "--artifacts-destination",
            str(store / "mlartifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=store,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so its uvicorn worker is stopped with it
        # no GenAI job runner (8 huey consumer processes): tracking does not use it, and it slows start-up
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    (store / "server.pid").write_text(str(proc.pid))  # = its process group id
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not come up: {(store / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)
        log.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left after ``grace_s``; returns when
    every process of the group (the CLI, its uvicorn worker) has exited."""
    if _group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while proc.poll() is None or _group_alive(proc.pid):
        if time.monotonic() > deadline:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            deadline = float("inf")  # killed: wait for the kernel to reap the orphans
        time.sleep(0.1)
