"""A real Hydra multirun: one MLflow parent run per sweep, one child per job named by what the sweep
varies, the sweep report on the parent (and as its description); ``python -m pipeline.runs`` lists it;
a failed job fails the parent."""

from __future__ import annotations

import re
import sys

import pytest
from mlflow.tracking import MlflowClient

from pipeline.runs.listing import main as runs_main
from tests.conftest import copy_store, run_cli, run_command, sqlite_uri
from tests.test_sweep import _check_report, _sweep_dir

NAMES = {"bs=32 workers=0", "bs=32 workers=2", "bs=64 workers=0", "bs=64 workers=2"}


@pytest.fixture(scope="module")
def sweep_2x2(tmp_path_factory, mlflow_template):
    """(root, the CLI's result, parent, children) of one real 2x2 multirun, shared by this module's tests."""
    root = tmp_path_factory.mktemp("sweep_2x2")
    copy_store(mlflow_template, root)
    # the store named explicitly: a module fixture runs before conftest's per-test environment clean-up
    # (an earlier test's mlflow.set_tracking_uri leaves MLFLOW_TRACKING_URI set)
    overrides = ["loader.batch_size=32,64", "loader.num_workers=0,2", "trainer.epochs=1"]
    proc = run_cli(root, "-m", *overrides, f"tracking.uri={sqlite_uri(root)}")
    assert proc.returncode == 0, proc.stderr
    assert "progress" not in proc.stdout + proc.stderr  # short phases log no progress lines
    client = MlflowClient(sqlite_uri(root))
    exp = client.get_experiment_by_name("pipeline")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pipeline.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("pipeline.role") == "job"]
    assert len(parents) == 1 and len(children) == 4
    return root, proc, parents[0], children


def test_2x2_multirun_gives_four_children_under_one_parent_and_a_report(sweep_2x2):
    root, proc, _, _ = sweep_2x2
    # every child FINISHED under one FINISHED parent, which carries the report of their own metrics
    parent, children, rows = _check_report(root, proc, 4)
    assert all(c.data.tags["pipeline.role"] == "job" for c in children)
    assert parent.data.tags["pipeline.role"] == "sweep"
    combos = {(c.data.params["loader.batch_size"], c.data.params["loader.num_workers"]) for c in children}
    assert combos == {("32", "0"), ("32", "2"), ("64", "0"), ("64", "2")}
    # one export shared by all four jobs
    assert len({c.data.tags["data.dir"] for c in children}) == 1
    assert sorted(c.data.tags["data.reused"] for c in children) == ["false", "true", "true", "true"]

    # the swept keys are the report's columns, a key common to every job is not
    assert {(r["loader.batch_size"], r["loader.num_workers"]) for r in rows} == combos
    assert "trainer.epochs" not in rows[0]
    fastest = max(children, key=lambda c: c.data.metrics["perf/train_samples_per_s"])
    best = f"loader.batch_size={fastest.data.params['loader.batch_size']}"
    assert parent.data.tags["sweep.best_config"] == (
        f"{best} loader.num_workers={fastest.data.params['loader.num_workers']}"
    )
    # the parent's id reached the jobs through the sweep dir too
    assert (_sweep_dir(root) / ".mlflow_parent_run_id").read_text().strip() == parent.info.run_id


def test_children_are_named_by_what_the_sweep_varies_and_the_parent_shows_the_report(sweep_2x2):
    root, _, parent, children = sweep_2x2
    assert {c.info.run_name for c in children} == NAMES
    for c in children:
        bs, workers = c.data.params["loader.batch_size"], c.data.params["loader.num_workers"]
        assert c.info.run_name == f"bs={bs} workers={workers}"
    tags = parent.data.tags
    assert tags["sweep.varied"] == "loader.batch_size loader.num_workers"
    note = tags["mlflow.note.content"]  # the parent's description in the MLflow UI
    best = max(children, key=lambda c: c.data.metrics["perf/train_samples_per_s"])
    first, table = note.split("\n| run |", 1)
    assert first == f"**Best** (highest `perf/train_samples_per_s`): **{best.info.run_name}** = " + (
        f"{best.data.metrics['perf/train_samples_per_s']:.4g}\n"
    )
    rows = [line for line in table.splitlines() if line.startswith("| bs=")]
    assert len(rows) == 4 and rows[0].startswith(f"| {best.info.run_name} | FINISHED |")
    client = MlflowClient(sqlite_uri(root))
    exp = client.get_experiment_by_name("pipeline")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_each_child_lists_the_export_as_its_train_and_val_dataset_inputs(sweep_2x2):
    _, _, _, children = sweep_2x2
    for c in children:
        inputs = {i.dataset.name: i for i in c.inputs.dataset_inputs}
        name = c.data.tags["data.dir"].rsplit("/", 1)[-1]
        assert set(inputs) == {f"{name}/train", f"{name}/val"}
        for context in ("train", "val"):
            ds = inputs[f"{name}/{context}"]
            assert {t.key: t.value for t in ds.tags} == {"mlflow.data.context": context}
            assert ds.dataset.digest == c.data.tags["data.content_sha256"][:36]
            assert '"num_samples": ' + c.data.params[f"data.num_{context}"] in ds.dataset.profile


def test_runs_command_lists_the_sweep_and_its_figures_without_torch(sweep_2x2):
    root, _, parent, children = sweep_2x2
    code = (
        "import runpy, sys\n"
        "sys.argv = ['pipeline.runs']\n"
        "try:\n    runpy.run_module('pipeline.runs', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'sklearn'}))\n"
    )
    proc = run_command(root, [sys.executable, "-c", code], timeout=120)
    assert proc.returncode == 0 and "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split() == [
        "status",
        "run",
        "overrides",
        "val",
        "acc",
        "samples/s",
        "data",
        "wait",
        "peak",
        "MB",
        "duration",
        "started",
        "id",
    ]
    body = lines[3:-1]
    assert len(body) == 5
    assert body[0].startswith(f"FINISHED  {parent.info.run_name}") and parent.info.run_id[:8] in body[0]
    assert "loader.batch_size=32,64 loader.num_workers=0,2" in body[0]
    for c in children:
        (line,) = [b for b in body if c.info.run_id[:8] in b]
        m = c.data.metrics
        figures = [
            f"{m['val/accuracy']:.3f}",
            f"{m['perf/train_samples_per_s']:.0f}",
            f"{m['perf/data_wait_fraction']:.0%}",
            f"{m['memory/peak_used_mb']:.0f}",
        ]
        assert re.search(r"\s+".join(map(re.escape, figures)), line), (figures, line)
        assert line.startswith("FINISHED    " + c.info.run_name)  # indented under its sweep
        assert f"loader.batch_size={c.data.params['loader.batch_size']}" in line


def test_runs_command_sweep_latest_and_failed(sweep_2x2, capsys):
    root, _, parent, children = sweep_2x2
    uri = ["--tracking-uri", sqlite_uri(root)]
    assert runs_main(["--sweep", "latest", *uri]) == 0
    out = capsys.readouterr().out
    assert all(r.info.run_id[:8] in out for r in [parent, *children])
    assert runs_main(["--sweep", parent.info.run_id[:6], *uri]) == 0
    assert capsys.readouterr().out.count("FINISHED") == 5
    assert runs_main(["--failed", *uri]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "(none)"
    assert runs_main(["--sweep", "ffffffff", *uri]) == 2


@pytest.mark.slow  # ~10 s; CI runs test_sweep's failed-job sweep (its report too)
def test_failed_job_fails_the_sweep_parent(tmp_path, capsys):
    proc = run_cli(
        tmp_path,
        "-m",
        "source=lfw",
        f"source.data_home={tmp_path}/none",
        "source.download_if_missing=false",
        "trainer.epochs=1",
    )
    assert proc.returncode != 0
    client = MlflowClient(sqlite_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    statuses = {r.data.tags.get("pipeline.role"): r.info.status for r in runs}
    assert statuses == {"sweep": "FAILED", "job": "FAILED"}
    # what broke, in the terminal: the failed runs with their error tag
    assert runs_main(["--failed"]) == 0  # the default store: this project's (PIPELINE_ROOT=tmp_path)
    out = capsys.readouterr().out
    (job,) = [r for r in runs if r.data.tags["pipeline.role"] == "job"]
    assert "error" in out.splitlines()[1]
    line = next(line for line in out.splitlines() if job.info.run_id[:8] in line)
    assert "LFWUnavailable: LFW data is not in" in line and line.startswith("FAILED")


def test_the_sweep_callback_pickles_without_its_heartbeat_thread(tmp_path):
    """Launchers running jobs in other processes (joblib, submitit) pickle Hydra's callbacks with the
    task: a started heartbeat (a thread, locks) must not go with them, and must keep beating here."""
    import pickle

    from pipeline.tracking.heartbeat import Heartbeat
    from pipeline.tracking.sweep import SweepCallback

    cb = SweepCallback(report=False)
    cb.parent_id, cb.uri = "abc123", f"sqlite:///{tmp_path}/nowhere.db"
    cb.heartbeat = Heartbeat(cb.uri, cb.parent_id, 3600.0).start()
    beat = cb.heartbeat
    try:
        copy = pickle.loads(pickle.dumps(cb))
        assert cb.heartbeat is beat  # the launcher's own callback keeps beating
    finally:
        beat.stop()
    assert copy.heartbeat is None and (copy.parent_id, copy.uri, copy.report) == ("abc123", cb.uri, False)
