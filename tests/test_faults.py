"""Real faults: an export killed with SIGKILL, a full disk, a read-only data dir, a DataLoader worker
killed mid-epoch, and an unreachable or unwritable tracking store."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from omegaconf import OmegaConf

from pipeline.data.export import ExportError, export, open_export
from pipeline.data.storage import get_format
from pipeline.tracking.store import TrackingError, prepare_store
from tests.conftest import REPO, compose_cfg, sqlite_uri, start_cli

# ----------------------------------------------------------------------------------------------
# Export killed with SIGKILL
# ----------------------------------------------------------------------------------------------

KILL_SOURCE = {
    "name": "synthetic",
    "num_samples": 1500,
    "shape": [16, 16],
    "num_classes": 5,
    "dtype": "float32",
    "seed": 3,
    "noise": 1.0,
    "block_size": 256,
}
EXPORTER = """
import json, sys
from omegaconf import OmegaConf
import pipeline.data.storage.npy, pipeline.data.storage.pt
from pipeline.data.export import export
print("READY", flush=True)
export(OmegaConf.create(json.loads(sys.argv[1])), OmegaConf.create({"name": sys.argv[2]}), sys.argv[3])
print("DONE", flush=True)
"""


def _start_exporter(fmt: str, data_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", EXPORTER, json.dumps(KILL_SOURCE), fmt, str(data_dir)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stdout.readline().strip() == "READY"
    return proc


def _state(data_dir: Path, name: str) -> str:
    if (data_dir / name).exists():
        return "published"
    if any(data_dir.glob(f".tmp-{name}-*")):
        return "temp-only"
    return "nothing"


def _kill_trials(tmp_path: Path, trials: int) -> None:
    rng = random.Random(trials)
    fmts = ["npy", "pt"]
    reference, durations = {}, {}
    for fmt in fmts:
        get_format(fmt)  # import torch etc. first: time the export alone, as in the subprocess after READY
    for fmt in fmts:  # an uninterrupted export: its duration bounds the kill times, its digests are the truth
        t0 = time.perf_counter()
        exp = export(OmegaConf.create(KILL_SOURCE), OmegaConf.create({"name": fmt}), tmp_path / f"ref-{fmt}")
        durations[fmt] = time.perf_counter() - t0
        reference[fmt] = open_export(exp.root, verify=True).manifest
    outcomes = []
    for trial in range(trials):
        fmt = fmts[trial % 2]
        data_dir = tmp_path / f"trial-{trial}"
        name = reference[fmt]["name"]
        proc = _start_exporter(fmt, data_dir)
        delay = rng.uniform(0, 1.1 * durations[fmt])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = _state(data_dir, name)
        if state == "published":  # anything under the published name must be complete and intact
            open_export(data_dir / name, verify=True)
        # the next run: builds (or reuses) and ends with a verified export equal to the reference
        exp = export(OmegaConf.create(KILL_SOURCE), OmegaConf.create({"name": fmt}), data_dir, verify=True)
        reused = exp.reused
        exp = open_export(exp.root, verify=True)
        assert reused == (state == "published")
        assert exp.manifest["content_sha256"] == reference[fmt]["content_sha256"]
        assert exp.manifest["files"]["list_sha256"] != "" and exp.manifest["files"]["count"] == 1501
        assert not list(data_dir.glob(".tmp-*")), "a killed build's temp folder was left behind"
        outcomes.append(
            f"{fmt} killed at {delay:.2f}s of {durations[fmt]:.2f}s: {state}; "
            f"next run {'reused' if reused else 'rebuilt'} it, verified"
        )
    print("\n".join(outcomes))


def test_export_killed_at_random_moments_quick(tmp_path):
    _kill_trials(tmp_path, trials=2)


@pytest.mark.slow
def test_export_killed_at_random_moments_10_trials(tmp_path):
    _kill_trials(tmp_path, trials=10)


# ----------------------------------------------------------------------------------------------
# Disk full, read-only data dir
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A real 1 MiB file system (tmpfs) that fills up; ``small_fs.readonly()`` remounts it read-only."""
    mnt = tmp_path / "small_fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")

    class FS(type(mnt)):
        def readonly(self):
            subprocess.run(["mount", "-o", "remount,ro", str(self)], check=True)

    try:
        yield FS(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def readonly_dir(tmp_path):
    """An existing directory nobody can write to: chmod for ordinary users, a read-only mount for root."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"root cannot be denied by chmod and cannot mount here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_mid_export_leaves_nothing_and_says_so(small_fs):
    # digits: 1797 x 256 B = 0.46 MB of samples passes the up-front check, but every .pt file takes a
    # 4 KiB page on tmpfs: the disk fills up in the middle of the export
    source, storage = OmegaConf.create({"name": "digits"}), OmegaConf.create({"name": "pt"})
    with pytest.raises(ExportError) as info:
        export(source, storage, small_fs)
    message = str(info.value)
    print(message)
    assert "the disk is full" in message and "No space left on device" in message
    assert "nothing was published" in message
    assert sorted(p.name for p in small_fs.iterdir()) == [".locks"]  # no folder, no temp left


def test_export_larger_than_free_space_is_refused_before_writing(small_fs):
    source = OmegaConf.create({**KILL_SOURCE, "num_samples": 2000})  # 2000 x 1 KiB = 2 MB > 1 MiB
    with pytest.raises(ExportError, match=r"not enough disk space .* need at least 2\.0 MB, [\d.]+ MB free"):
        export(source, OmegaConf.create({"name": "npy"}), small_fs)
    assert sorted(p.name for p in small_fs.iterdir()) == [".locks"]


def test_read_only_data_dir_fails_naming_it(readonly_dir):
    with pytest.raises(ExportError) as info:
        export(OmegaConf.create({"name": "digits"}), OmegaConf.create({"name": "npy"}), readonly_dir)
    print(info.value)
    assert f"cannot write to the data dir {readonly_dir}" in str(info.value)
    assert "Read-only file system" in str(info.value) or "Permission denied" in str(info.value)
    assert list(readonly_dir.iterdir()) == []


def test_export_failure_marks_the_mlflow_run_failed(tmp_path, small_fs):
    from mlflow.tracking import MlflowClient

    from pipeline.job import run

    cfg = compose_cfg(tmp_path, [f"paths.data_dir={small_fs}", "storage=pt", "trainer.epochs=1"])
    with pytest.raises(ExportError, match="the disk is full"):
        run(cfg)
    client = MlflowClient(cfg.tracking.uri)
    [r] = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert r.info.status == "FAILED" and "No space left on device" in r.data.tags["error"]


# ----------------------------------------------------------------------------------------------
# A loader worker killed mid-epoch (the project's own workers; a stock DataLoader's below)
# ----------------------------------------------------------------------------------------------


WORKER_ARGS = [
    "source=synthetic",
    "source.num_samples=1000",
    "source.shape=[8,8]",
    "storage=npy",
    "loader.num_workers=2",
    "loader.batch_size=16",
    "loader.persistent_workers=true",  # the same workers all run long: the kill lands mid-epoch
    "trainer.epochs=60",  # longer than the kill takes, bounded if it never lands
]


def _kill_a_worker_when_training(parent_pid: int, killed: list, timeout: float = 240) -> None:
    """SIGKILL one DataLoader worker of ``parent_pid``'s job once it has run for a moment. A worker is a
    forked child, started after this call, still running the parent's command line: a subprocess (``git``
    for the lineage) shows that command line too between its fork and exec, so it is checked again
    right before the kill."""
    deadline = time.monotonic() + timeout
    parent = psutil.Process(parent_pid)
    earlier = set(parent.children())  # e.g. workers of an earlier in-process job not yet collected
    while time.monotonic() < deadline:
        for child in set(_forked_children(parent)) - earlier:
            time.sleep(0.5)  # let it get into the epoch
            if child not in _forked_children(parent):  # exited or exec'd meanwhile: look again
                break
            try:
                child.kill()  # psutil checks the pid still names the same process
            except psutil.NoSuchProcess:
                break
            killed.append(child.pid)
            return
        time.sleep(0.1)


def _forked_children(parent: psutil.Process) -> list[psutil.Process]:
    try:
        return [c for c in parent.children() if c.cmdline() == parent.cmdline()]
    except psutil.Error:  # one exited or is a zombie meanwhile
        return []


def _assert_failed_run(root: Path, victim: int) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/outputs/mlflow.db")
    [r] = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    error = r.data.tags["error"]
    assert r.info.status == "FAILED", r.info.status
    assert (
        error.startswith("WorkerDied: loader worker") and f"(pid {victim}) killed by signal: SIGKILL" in error
    )
    assert "lower loader.num_workers" in error
    return error


def test_dataloader_worker_killed_mid_epoch_fails_the_run(tmp_path):
    """In-process job, a real forked worker killed with SIGKILL from another thread."""
    import threading

    from pipeline.job import run
    from pipeline.training.workers import WorkerDied

    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_when_training, args=(os.getpid(), killed), daemon=True)
    killer.start()
    with pytest.raises(WorkerDied) as info:
        run(compose_cfg(tmp_path, WORKER_ARGS))
    killer.join(5)
    assert killed and str(killed[0]) in str(info.value)
    print(_assert_failed_run(tmp_path, killed[0]))


def test_worker_death_wrapped_by_a_library_is_still_explained():
    """The SIGCHLD can land inside MLflow's SQLAlchemy session, which re-raises torch's error as an
    MlflowException (seen in CI): the run must still fail with WorkerDied naming the worker."""
    from mlflow.exceptions import MlflowException

    from pipeline.training.workers import WorkerDied, worker_deaths_explained

    with pytest.raises(WorkerDied, match=r"worker \(pid 4242\) is killed by signal: Killed.*OOM") as info:
        with worker_deaths_explained():
            try:
                raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
            except RuntimeError as err:
                raise MlflowException(message=err) from err
    assert isinstance(info.value.__cause__, MlflowException)
    with pytest.raises(MlflowException, match="unrelated"):  # anything else passes through unchanged
        with worker_deaths_explained():
            raise MlflowException("unrelated")


def _worker_of_this_process(before: set) -> psutil.Process:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = [c for c in psutil.Process().children() if c.pid not in before]
        if new:
            return new[0]
        time.sleep(0.01)
    raise AssertionError("no DataLoader worker started")


def _iterate_after_killing_a_worker(victims: list) -> None:
    """A real loader with one forked worker, the worker SIGKILLed after the first batch, then read on."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    before = {c.pid for c in psutil.Process().children()}
    batches = iter(DataLoader(TensorDataset(torch.arange(64.0)), batch_size=4, num_workers=1))
    next(batches)
    worker = _worker_of_this_process(before)
    victims.append(worker.pid)
    worker.kill()
    # wait until it has exited (left unreaped: torch reaps it): its SIGCHLD is then due. Reading on
    # before that can meet a batch it queued but can no longer hand over (ConnectionResetError while
    # unpickling its shared memory), and torch's error would then land later, anywhere.
    os.waitid(os.P_PID, worker.pid, os.WEXITED | os.WNOWAIT)
    for _ in batches:
        pass


def test_a_killed_worker_surfaces_as_worker_died_naming_it():
    """torch's own detection (its SIGCHLD handler, or the loader's check while it waits) raises its
    error wherever the main thread is; at the boundary it becomes WorkerDied with the worker's pid."""
    from pipeline.training.workers import WorkerDied, worker_deaths_explained

    victims: list[int] = []
    with pytest.raises(WorkerDied, match=r"DataLoader worker \(pid.*lower loader.num_workers") as info:
        with worker_deaths_explained():
            _iterate_after_killing_a_worker(victims)
    assert victims and str(victims[0]) in str(info.value)
    assert "DataLoader worker (pid" in str(info.value.__cause__)  # torch's own error, kept as the cause


def test_a_worker_killed_with_batches_queued_is_named_although_reading_them_fails_first():
    """Reading a batch that a SIGKILLed worker had queued fails (ConnectionResetError: its shared memory
    can no longer be fetched) usually before the worker's SIGCHLD arrives: the boundary waits for
    torch's error and names the worker. (Raised here right after the kill, as the loader would.)"""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.training.workers import WorkerDied, worker_deaths_explained

    before = {c.pid for c in psutil.Process().children()}
    batches = iter(DataLoader(TensorDataset(torch.arange(64.0)), batch_size=4, num_workers=1))
    next(batches)
    worker = _worker_of_this_process(before)
    with pytest.raises(WorkerDied, match=r"DataLoader worker \(pid.*lower loader.num_workers") as info:
        with worker_deaths_explained():
            worker.kill()
            raise ConnectionResetError(104, "Connection reset by peer")
    assert str(worker.pid) in str(info.value)
    del batches


def test_an_unrelated_error_after_a_handled_worker_death_stays_itself():
    """A worker death that was caught and dealt with must not turn a later, unrelated error into
    WorkerDied (the old recorder did: every later exception was blamed on the dead worker)."""
    from pipeline.training.workers import WorkerDied, worker_deaths_explained

    with pytest.raises(ValueError, match="unrelated") as info:
        with worker_deaths_explained():
            try:
                _iterate_after_killing_a_worker([])
            except RuntimeError as err:
                assert "DataLoader worker (pid" in str(err)
            raise ValueError("unrelated")
    assert not isinstance(info.value, WorkerDied)


@pytest.mark.slow
def test_dataloader_worker_killed_mid_epoch_fails_the_cli_run(tmp_path):
    proc = start_cli(tmp_path, *WORKER_ARGS, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed: list[int] = []
    try:
        _kill_a_worker_when_training(proc.pid, killed)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed and proc.returncode != 0
    assert "WorkerDied" in stderr and str(killed[0]) in stderr, stderr[-3000:]
    _assert_failed_run(tmp_path, killed[0])


# ----------------------------------------------------------------------------------------------
# Tracking store unreachable or unwritable: fails at start, naming the URI, before data work
# ----------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_at_start_naming_the_uri(tmp_path):
    from pipeline.job import run

    uri = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError) as info:
        run(compose_cfg(tmp_path, [f"tracking.uri={uri}"]))
    # MLflow's default HTTP retries would take minutes: the run must give up at once
    assert time.monotonic() - started < 120
    assert f"MLflow tracking store {uri} cannot be used" in str(info.value)
    assert "Connection refused" in str(info.value)
    assert not (tmp_path / "outputs" / "data").exists()  # no data work was done
    print(str(info.value)[:300])


def test_sqlite_store_in_read_only_dir_fails_naming_the_uri(tmp_path, readonly_dir):
    from pipeline.job import run

    uri = f"sqlite:///{readonly_dir}/mlflow.db"
    cfg = compose_cfg(tmp_path, [f"tracking.uri={uri}"])
    with pytest.raises(TrackingError, match=rf"MLflow tracking store {uri} cannot be used: .*open database"):
        run(cfg)
    assert not Path(cfg.paths.data_dir).exists()


def test_existing_sqlite_store_made_read_only_fails_at_start(small_fs, mlflow_template):
    uri = f"sqlite:///{small_fs}/mlflow.db"
    shutil.copyfile(mlflow_template, small_fs / "mlflow.db")  # a working store; no handle open on it
    small_fs.readonly()
    with pytest.raises(TrackingError, match=rf"{uri} cannot be used: .*readonly database") as info:
        prepare_store(uri, "pipeline", str(small_fs / "art"))
    print(info.value)


def test_unwritable_artifact_location_fails_at_start(tmp_path, readonly_dir):
    uri = sqlite_uri(tmp_path)  # a working store (conftest.py)
    with pytest.raises(TrackingError, match=rf"{uri} cannot be used: .*{readonly_dir}"):
        prepare_store(uri, "pipeline", str(readonly_dir / "artifacts"))
