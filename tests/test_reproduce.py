"""``python -m pipeline.runs.reproduce RUN_ID``: rerun from MLflow's records, compare metric by metric."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.runs.reproduce import compare, main, report, rerun_overrides
from tests.conftest import REPO, run_cli, sqlite_uri
from tests.run_helpers import FAST, client, run_job


def test_rerun_overrides_drop_locations_and_resume_and_append_extras():
    original = [
        "trainer.epochs=4",
        "paths.root=/elsewhere",
        "hydra.run.dir=/x",
        "export.engine=dask",
        "export.address=tcp://10.0.0.5:8786",
        "tracking.uri=sqlite:////old.db",
        "tracking.experiment=exp",
        "+trainer.resume=abc",
        "model=cnn",
    ]
    assert rerun_overrides(original, ["loader.num_workers=2"]) == [
        "trainer.epochs=4",
        "tracking.experiment=exp",
        "model=cnn",
        "loader.num_workers=2",
    ]


def test_compare_matches_equal_runs_and_flags_a_different_one(tmp_path):
    a = run_job(tmp_path, ["trainer.epochs=2"], "a")
    b = run_job(tmp_path, ["trainer.epochs=2"], "b")
    c = run_job(tmp_path, ["trainer.epochs=2", "trainer.lr=0.002"], "c")
    mc = client(tmp_path)
    rows = compare(mc, mc.get_run(a), mc.get_run(b))
    assert {r["metric"] for r in rows} >= {"train/loss", "train/accuracy", "val/loss", "val/accuracy"}
    assert all(r["status"] == "match" and r["diff"] == 0 for r in rows)
    diverged = {r["metric"]: r for r in compare(mc, mc.get_run(a), mc.get_run(c))}
    assert diverged["train/loss"]["status"] == "DIVERGED" and diverged["train/loss"]["diff"] > 0
    assert diverged["train/samples_seen"]["status"] == "match"
    out = io.StringIO()
    report(mc.get_run(a), mc.get_run(c), list(diverged.values()), out=out)
    text = out.getvalue()
    assert "config keys that differ (paths/tracking not shown): 1\n  trainer.lr: 0.001 -> 0.002" in text, text


def test_unknown_run_or_one_without_overrides_exits_2(tmp_path, capsys):
    uri = sqlite_uri(tmp_path)
    in_process = run_job(tmp_path, ["trainer.epochs=1"])  # not started by the CLI: no hydra/ artifact
    assert main(["0" * 32, "--tracking-uri", uri]) == 2
    assert "no run" in capsys.readouterr().err
    assert main([in_process, "--tracking-uri", uri]) == 2
    assert "no hydra/overrides.yaml" in capsys.readouterr().err


def _reproduce(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIPELINE_ROOT": str(root), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.runs.reproduce", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_reproduce_matches_then_detects_changed_data(tmp_path):
    done = run_cli(tmp_path, *FAST, "trainer.epochs=2")
    assert done.returncode == 0, done.stderr[-3000:]
    mc = client(tmp_path)
    (original,) = mc.search_runs(["1"])
    run_id = original.info.run_id

    # the rerun uses 2 workers where the original used none: the result must not change
    same = _reproduce(tmp_path, run_id, "loader.num_workers=2")
    assert same.returncode == 0, same.stdout + same.stderr[-3000:]
    assert "reproduce: MATCH" in same.stdout and "DIVERGED" not in same.stdout
    assert "loader.num_workers: 0 -> 2" in same.stdout  # the report names what was changed
    reruns = mc.search_runs(["1"], filter_string=f"tags.`pipeline.reproduces` = '{run_id}'")
    assert len(reruns) == 1 and reruns[0].data.tags["pipeline.reproduce_result"] == "match"

    # bit rot: sample contents change under the same sizes and mtimes, so the export's cheap stat check
    # passes and it is reused (only verify=true would re-hash it): the rerun must diverge
    (export_dir,) = (tmp_path / "outputs" / "data").glob("digits-npy-*")
    for path in sorted((export_dir / "samples").rglob("*.npy"))[:300]:
        st = path.stat()
        sample = np.load(path, allow_pickle=False)
        np.save(path, np.zeros_like(sample), allow_pickle=False)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = _reproduce(tmp_path, run_id)
    assert changed.returncode == 1, changed.stdout + changed.stderr[-3000:]
    assert "reproduce: DIVERGED" in changed.stdout
    assert any(line.startswith("train/loss") and "DIVERGED" in line for line in changed.stdout.splitlines())
