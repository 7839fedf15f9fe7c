"""Checkpoints each epoch and ``trainer.resume``: a resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pipeline.config.validate import ConfigError
from pipeline.runs.checkpoint import CheckpointDir, CheckpointError, list_checkpoints, load_checkpoint
from pipeline.runs.resume import open_resume
from tests.conftest import compose_cfg, sqlite_uri, start_cli
from tests.run_helpers import FAST, client, histories, run_id_for, run_job


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """Checkpoints on disk; 2 epochs resumed to 4 give every per-epoch metric of a straight 4-epoch run."""
    full = run_job(tmp_path, ["trainer.epochs=4"], "full")
    folder = tmp_path / "full" / "checkpoints"
    assert [e for e, _ in list_checkpoints(folder)] == [3, 4]  # trainer.keep_checkpoints=2
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    state = load_checkpoint(folder / "epoch_0004.pt")  # torch.load(weights_only=True) inside
    assert state["epoch"] == 4 and len(state["history"]) == 4 and state["run_id"] == full
    assert {"model", "optimizer", "rng", "config"} <= set(state)
    assert isinstance(state["rng"]["generators"]["train"], torch.Tensor)
    part = run_job(tmp_path, ["trainer.epochs=2"], "part")
    c = client(tmp_path)
    c.update_run(part, status="RUNNING")  # what a SIGKILL leaves behind (test_sigkill_... does it for real)
    resumed = run_job(tmp_path, ["trainer.epochs=4", f"trainer.resume={part}"], "resumed")
    assert histories(tmp_path, resumed) == histories(tmp_path, full)
    tags = c.get_run(resumed).data.tags
    assert tags["pipeline.resumed_from"] == part and tags["pipeline.resumed_from_epoch"] == "2"
    original = c.get_run(part)
    assert original.info.status == "KILLED" and original.data.tags["pipeline.resumed_by"] == resumed
    assert c.get_run(resumed).data.metrics["train/samples_seen"] == 4 * 1437


def test_resumed_samples_seen_is_carried_from_the_checkpoint_not_derived(tmp_path):
    """train/samples_seen is counted batch by batch, per epoch; a resumed run starts from the count its
    checkpoint holds (here altered on purpose: a formula would not see the change)."""
    part = run_job(tmp_path, ["trainer.epochs=2"], "part")
    assert [v for _, v in histories(tmp_path, part, ["train/samples_seen"])["train/samples_seen"]] == [
        1437,
        2874,
    ]
    path = tmp_path / "part" / "checkpoints" / "epoch_0002.pt"
    state = load_checkpoint(path)
    assert state["samples_seen"] == 2874
    state["samples_seen"] = 1000
    torch.save(state, path)
    resumed = run_job(tmp_path, ["trainer.epochs=3", f"trainer.resume={path}"], "resumed")
    assert client(tmp_path).get_run(resumed).data.metrics["train/samples_seen"] == 1000 + 1437


def test_resume_refuses_another_config_a_finished_one_and_a_live_run(tmp_path):
    run_job(tmp_path, ["trainer.epochs=1"], "a")
    resume_a = f"trainer.resume={tmp_path}/a"
    cfg = compose_cfg(tmp_path, [*FAST, "trainer.epochs=3", "trainer.lr=0.01", resume_a])
    with pytest.raises(ConfigError, match=r"trainer\.lr: checkpoint 0\.001, now 0\.01"):
        open_resume(cfg)
    # worker settings and where outputs go may change
    ok = compose_cfg(tmp_path, [*FAST, "trainer.epochs=3", "loader.num_workers=2", resume_a])
    assert open_resume(ok).epoch == 1
    done = compose_cfg(tmp_path, [*FAST, "trainer.epochs=1", resume_a])
    with pytest.raises(ConfigError, match="already holds 1 epochs"):
        open_resume(done)
    with CheckpointDir(tmp_path / "a" / "checkpoints"):  # as if run "a" were still training
        with pytest.raises(ConfigError, match="still running"):
            open_resume(ok)


def test_resume_target_errors_are_clear(tmp_path):
    for target, message in [
        ("no-such-thing", "not an MLflow run id"),
        ("0" * 32, "no such run"),
        (str(tmp_path), "no checkpoint"),
    ]:
        cfg = compose_cfg(tmp_path, [f"trainer.resume={target}"])
        with pytest.raises(CheckpointError, match=message):
            open_resume(cfg)


def _cli(root: Path, run_dir: str, *overrides: str) -> subprocess.Popen:
    run_dir = f"hydra.run.dir={root}/{run_dir}"
    return start_cli(root, *FAST, run_dir, *overrides, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_after_epoch_2_of_4_then_resume_matches_uninterrupted(tmp_path):
    from pipeline.tracking.store import prepare_store

    # the experiment made once, before the two jobs start, with the artifact folder a job would give it
    prepare_store(sqlite_uri(tmp_path), "pipeline", str(tmp_path / "outputs" / "mlartifacts"))
    overrides = ("trainer.epochs=4", "trainer.keep_checkpoints=0")
    straight = _cli(tmp_path, "straight", *overrides)
    victim = _cli(tmp_path, "victim", *overrides)
    marker = tmp_path / "victim" / "checkpoints" / "epoch_0002.pt"
    deadline = time.monotonic() + 300
    while not marker.exists():  # the checkpoint is renamed into place complete: epoch 2 is done
        assert victim.poll() is None, f"the job ended before epoch 2: {victim.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no epoch-2 checkpoint within 300 s"
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "victim" / "checkpoints" / "epoch_0004.pt").exists()
    killed = run_id_for(tmp_path, tmp_path / "victim")
    c = client(tmp_path)
    assert c.get_run(killed).info.status == "RUNNING"  # nothing ran after SIGKILL

    resumed = _cli(tmp_path, "resumed", *overrides, f"trainer.resume={killed}")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-3000:]
    resumed_id = run_id_for(tmp_path, tmp_path / "resumed")
    straight_id = run_id_for(tmp_path, tmp_path / "straight")

    final = {k: v[-1] for k, v in histories(tmp_path, resumed_id).items()}
    assert final == {k: v[-1] for k, v in histories(tmp_path, straight_id).items()}
    assert all(step == 3 for step, _ in final.values())
    assert histories(tmp_path, resumed_id) == histories(tmp_path, straight_id)
    tags = c.get_run(resumed_id).data.tags
    assert tags["pipeline.resumed_from"] == killed and 2 <= int(tags["pipeline.resumed_from_epoch"]) < 4
    assert c.get_run(killed).info.status == "KILLED"
    assert c.get_run(killed).data.tags["pipeline.resumed_by"] == resumed_id


@pytest.mark.parametrize(
    "override, key",
    [("trainer.keep_checkpoints=-1", "trainer.keep_checkpoints"), ("trainer.resume=' '", "trainer.resume")],
)
def test_bad_checkpoint_settings_are_refused_by_validate(tmp_path, override, key):
    from pipeline.config.validate import validate

    with pytest.raises(ConfigError, match=key):
        validate(compose_cfg(tmp_path, [override]))


@pytest.mark.parametrize(
    "storage",
    # slow: ~5-7 s each; test_resumed_run_equals_uninterrupted_run resumes shards (the default) in the suite
    [pytest.param(s, marks=pytest.mark.slow) for s in ("memmap", "shards")],
)
def test_resume_replays_the_batch_samplers_of_the_fast_formats(tmp_path, storage):
    """The formats' own batch samplers are epoch-indexed too: resuming at epoch 1 gives epochs 2-3 of a
    straight run, and the shuffle differs from epoch to epoch. memmap runs with transform=flip_crop: the
    augmentation's draws (per epoch and batch) and the normalisation figures are replayed too."""
    fmt = [f"storage={storage}", "storage.shard_size_mb=1"] if storage == "shards" else [f"storage={storage}"]
    if storage == "memmap":
        fmt.append("transform=flip_crop")
    full = run_job(tmp_path, [*fmt, "trainer.epochs=3"], "full")
    part = run_job(tmp_path, [*fmt, "trainer.epochs=1"], "part")
    client(tmp_path).update_run(part, status="RUNNING")
    resumed = run_job(tmp_path, [*fmt, "trainer.epochs=3", f"trainer.resume={part}"], "resumed")
    assert histories(tmp_path, resumed) == histories(tmp_path, full)
    losses = [v for _, v in histories(tmp_path, full)["train/loss"]]
    assert len(set(losses)) == 3
