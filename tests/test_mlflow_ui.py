"""The MLflow UI, checked in a real browser: a job logs to a real ``mlflow server`` on 127.0.0.1, then
headless Chromium opens the run's page and the plot artifacts' pages.

Needs Debian's ``chromium`` package (``apt-get install -y chromium``); skipped with that instruction when
no Chromium is installed. Screenshots are saved under the test's tmp dir and copied to
``outputs/test-artifacts/mlflow_ui/`` in the checkout (git-ignored); the test prints where.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from html import unescape
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import REPO, run_cli

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
PLOTS = ("samples.png", "loss.png", "accuracy.png", "confusion_matrix.png")
# flags that work in this sandbox: no GPU, no sandbox as root, no background traffic to Google
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1200",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(  # CI=1 makes a missing Chromium a failure, for a run that means to check the UI
        CHROMIUM is None and not os.environ.get("CI"),
        reason="no Chromium: install Debian's package (apt-get install -y chromium)",
    ),
]


def _chromium(tmp_path: Path, *args: str, budget_ms: int) -> str:
    profile = tmp_path / f"chromium-profile-{time.monotonic_ns()}"  # fresh, empty profile every time
    proc = subprocess.run(
        [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _js_number(value: float) -> str:
    """How JavaScript prints a float: the shortest round-trip digits, like repr, but 1 for 1.0."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _page_text(html: str) -> str:
    text = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", text)))


def _dump_until(tmp_path: Path, url: str, wanted: list[str]) -> str:
    """The page's DOM once the UI has rendered everything in ``wanted`` (retrying with more time)."""
    for budget in (20_000, 60_000):
        dom = _chromium(tmp_path, "--dump-dom", url, budget_ms=budget)
        if all(w in dom for w in wanted):
            return dom
    missing = [w for w in wanted if w not in dom]
    pytest.fail(f"{url} never showed {missing}; page text: {_page_text(dom)[:3000]}")


def _screenshot(tmp_path: Path, url: str, name: str) -> Path:
    path = tmp_path / "screenshots" / name
    path.parent.mkdir(exist_ok=True)
    _chromium(tmp_path, f"--screenshot={path}", url, budget_ms=30_000)
    with Image.open(path) as img:
        assert img.size == (1600, 1200) and np.asarray(img.convert("L")).std() > 10  # not a blank page
    keep = REPO / "outputs" / "test-artifacts" / "mlflow_ui"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, keep / name)
    print(f"screenshot: {keep / name} (and {path})")
    return path


def test_run_page_shows_params_metrics_and_plots(tmp_path, mlflow_server):
    proc = run_cli(tmp_path, "trainer.epochs=2", f"tracking.uri={mlflow_server}", timeout=600)
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("pipeline")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    run_page = f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"

    # Overview: parameter names and values, metric names and values, as the UI renders them
    params, metrics = run.data.params, run.data.metrics
    wanted = ["loader.batch_size", "trainer.epochs", "source.name", "val/accuracy", "train/loss"]
    text = _page_text(_dump_until(tmp_path, run_page, wanted))
    for key in ("loader.batch_size", "trainer.epochs", "source.name", "storage.name"):
        assert re.search(rf"{re.escape(key)} {re.escape(params[key])}\b", text), key
    for key in ("val/accuracy", "train/loss", "val/loss"):
        assert f"{key} {_js_number(metrics[key])}" in text, key  # the UI prints the full float
    _screenshot(tmp_path, run_page, "run_overview.png")

    # Artifacts: each plot's page shows the image, fetched from the server into the page (a blob: URL)
    served = Path(client.download_artifacts(run.info.run_id, "plots", str(tmp_path / "down")))
    local = sorted((tmp_path / "outputs" / "runs").glob("*/*/plots"))[0]
    for name in PLOTS:
        assert (served / name).read_bytes() == (local / name).read_bytes(), name  # the server has the file
        page = f"{run_page}/artifacts/plots/{name}"
        dom = _dump_until(tmp_path, page, [f'alt="plots/{name}"'])
        assert re.search(rf'<img alt="plots/{re.escape(name)}" src="blob:', dom), name
    _screenshot(tmp_path, f"{run_page}/artifacts/plots/loss.png", "artifact_loss.png")
    _screenshot(tmp_path, f"{run_page}/artifacts/plots/samples.png", "artifact_samples.png")


def test_experiment_sweep_and_dataset_pages_read_well(tmp_path, mlflow_server):
    """A 2x2 sweep logged to the server: the experiment link the sweep prints opens on model-training
    runs; the parent's overview shows the report table (best first) and its children by distinct names;
    a child's page lists the export as its train/val dataset inputs."""
    from pipeline.tracking.dataset_input import DIGEST_CHARS
    from pipeline.tracking.store import ui_url

    proc = run_cli(
        tmp_path,
        "-m",
        "loader.batch_size=32,64",
        "loader.num_workers=0,2",
        "trainer.epochs=1",
        "tracking.log_model=false",
        f"tracking.uri={mlflow_server}",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("pipeline")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags["pipeline.role"] == "sweep"]
    children = [r for r in runs if r.data.tags["pipeline.role"] == "job"]
    names = sorted(c.info.run_name for c in children)
    assert names == ["bs=32 workers=0", "bs=32 workers=2", "bs=64 workers=0", "bs=64 workers=2"]

    # the experiment, as the link the sweep prints opens it: its runs in the model-training view
    exp_page, parent_page = re.search(r"MLflow UI: (\S+) \(the sweep: (\S+)\)", proc.stdout).groups()
    assert exp_page == ui_url(mlflow_server, exp.experiment_id)
    assert exp_page == f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    text = _page_text(_dump_until(tmp_path, exp_page, [parent.info.run_name, "Dataset"]))
    assert text.lstrip().startswith(f"Runs - Experiment {exp.experiment_id}")
    assert "Model registry" in text and "Token Usage" not in text  # model training, not GenAI traces
    _screenshot(tmp_path, exp_page, "experiment_runs.png")

    # the sweep's parent: its report table as the description, best first, and its children's names
    wanted = ["<table>", "Child runs", *names]
    dom = _dump_until(tmp_path, parent_page, wanted)
    table = re.search(r"<table>.*?</table>", dom, re.S).group(0)
    cells = [_page_text(c).strip() for c in re.findall(r"<td>(.*?)</td>", table, re.S)]
    ranked = sorted(children, key=lambda c: -c.data.metrics["perf/train_samples_per_s"])
    assert cells[0] == ranked[0].info.run_name and set(cells) >= set(names)
    text = _page_text(dom)
    best = rf"Best \(highest\s*perf/train_samples_per_s\s*\):\s*{re.escape(ranked[0].info.run_name)} ="
    assert re.search(best, text), text[:3000]
    listed = re.search(r"Child runs (.*?) Source", text).group(1)
    assert sorted(n.strip() for n in listed.split(",")) == names  # four distinct names
    _screenshot(tmp_path, parent_page, "sweep_parent_overview.png")

    # a child's page: the export as its dataset inputs (name, content digest, context)
    child = ranked[0]
    export = child.data.tags["data.dir"].rsplit("/", 1)[-1]
    digest = child.data.tags["data.content_sha256"][:DIGEST_CHARS]
    page = ui_url(mlflow_server, exp.experiment_id, child.info.run_id)
    text = _page_text(_dump_until(tmp_path, page, [f"{export}/train"]))
    assert re.search(rf"Datasets {re.escape(export)}/(train|val) \({digest}\) (train|val) \+1", text), text[
        :3000
    ]
    _screenshot(tmp_path, page, "run_dataset_inputs.png")
