"""Shared fixtures: a throw-away project root per test, Hydra's compose API, and the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test writes into the checkout's outputs/ or reads a developer's MLflow settings."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PIPELINE_MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def compose_cfg(root: Path, overrides: list[str] = ()):
    """Compose conf/config.yaml like the CLI does, with paths under ``root``."""
    import pipeline.config  # noqa: F401  registers schemas and resolvers

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[f"paths.root={root}", f"paths.output_dir={root}/run", *overrides],
        )


def run_command(root: Path, argv: list[str], timeout: float = 300, env: dict | None = None):
    """Run ``argv`` for real, in a subprocess in ``root``, with this checkout importable and outputs under
    ``root``."""
    full_env = {**os.environ, "PIPELINE_ROOT": str(root), "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(argv, cwd=root, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_cli(root: Path, *args: str, timeout: float = 300, env: dict | None = None):
    """Run ``python -m pipeline`` for real, in a subprocess, with outputs under ``root``."""
    return run_command(root, [sys.executable, "-m", "pipeline", *args], timeout, env)


def sqlite_uri(root: Path) -> str:
    return f"sqlite:///{root}/outputs/mlflow.db"


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite + artifacts under tmp_path/server); yields its URL."""
    from tests.mlflow_server import serve

    with serve(tmp_path / "server") as url:
        yield url
