"""Real faults: an export killed with SIGKILL, a full disk, a read-only data dir, a DataLoader worker
killed mid-epoch, and an unreachable or unwritable tracking store."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from omegaconf import OmegaConf

from pipeline.export import ExportError, export, open_export
from pipeline.storage import get_format
from pipeline.tracking import TrackingError, prepare_store
from tests.conftest import REPO, compose_cfg, run_cli

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
import pipeline.storage.npy, pipeline.storage.pt
from pipeline.export import export
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

    cfg = compose_cfg(tmp_path, [f"paths.data_dir={small_fs}", "trainer.epochs=1"])
    with pytest.raises(ExportError, match="the disk is full"):
        run(cfg)
    client = MlflowClient(cfg.tracking.uri)
    [r] = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert r.info.status == "FAILED" and "No space left on device" in r.data.tags["error"]


# ----------------------------------------------------------------------------------------------
# A DataLoader worker killed mid-epoch
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
    assert error.startswith("WorkerDied: DataLoader worker (pid") and str(victim) in error, error
    assert "lower loader.num_workers" in error
    return error


def test_dataloader_worker_killed_mid_epoch_fails_the_run(tmp_path):
    """In-process job, a real forked worker killed with SIGKILL from another thread."""
    import threading

    from pipeline.job import run
    from pipeline.loading import WorkerDied

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

    from pipeline.loading import WorkerDied, worker_deaths_explained

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


def test_worker_death_is_raised_by_the_loader_not_wherever_the_signal_lands():
    """Inside worker_deaths_explained torch's SIGCHLD handler does not raise at a random spot (in CI it
    hit MLflow's database session); the loader raises when it waits for the dead worker's batch."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.loading import WorkerDied, worker_deaths_explained

    reached_the_loader = False
    with pytest.raises(WorkerDied, match=r"is killed by signal: Killed.*lower loader.num_workers") as info:
        with worker_deaths_explained():
            batches = iter(DataLoader(TensorDataset(torch.arange(64.0)), batch_size=4, num_workers=1))
            next(batches)
            worker = psutil.Process(batches._workers[0].pid)
            worker.kill()
            deadline = time.monotonic() + 30
            while worker.status() != psutil.STATUS_ZOMBIE:  # dead, and its SIGCHLD delivered
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.3)  # plain Python code here: torch's own handler would raise in it
            reached_the_loader = True
            for _ in batches:
                pass
    assert reached_the_loader and f"pid {worker.pid})" in str(info.value)
    assert "exited unexpectedly" in str(info.value.__cause__)  # what the loader itself raised


def test_worker_killed_while_a_batch_is_in_transit_is_named_by_the_loader(monkeypatch):
    """A worker killed while its batch is handed over breaks the transfer (seen in CI as a reset
    connection) a moment before it shows as dead, so torch's own check finds it alive: the loader
    waits for a worker to show as dead and names it. Here the transfer is broken for real by closing
    the receiving end of the data queue, and the worker is SIGKILLed 0.3 s later."""
    import threading

    import torch
    from torch.utils.data import TensorDataset

    from pipeline import loading
    from pipeline.loading import BatchedLoader, WorkerDied, worker_deaths_explained

    def broken_transfer():
        batches = iter(BatchedLoader(TensorDataset(torch.arange(64.0)), batch_size=4, num_workers=1))
        next(batches)
        batches._data_queue._reader.close()  # the next get() fails with OSError, the worker still alive
        return batches, psutil.Process(batches._workers[0].pid)

    with pytest.raises(WorkerDied, match=r"pid (\d+)\) is killed by signal: Killed") as info:
        with worker_deaths_explained():
            batches, worker = broken_transfer()
            threading.Timer(0.3, worker.kill).start()
            next(batches)
    assert f"pid {worker.pid})" in str(info.value)
    assert isinstance(info.value.__cause__.__cause__, OSError)  # WorkerDied <- loader's error <- OSError

    monkeypatch.setattr(loading, "IPC_GRACE_S", 0.3)
    batches, worker = broken_transfer()
    with pytest.raises(OSError):  # no worker died: the error passes through as it was
        next(batches)
    assert worker.is_running()
    del batches  # shuts the loader down: its worker leaves torch's watch list and exits


@pytest.mark.slow
def test_dataloader_worker_killed_mid_epoch_fails_the_cli_run(tmp_path):
    env = {**os.environ, "PIPELINE_ROOT": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *WORKER_ARGS],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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
    uri = f"http://127.0.0.1:{_closed_port()}"
    # MLflow's default HTTP retries would take minutes: the run must give up well within the timeout
    proc = run_cli(tmp_path, f"tracking.uri={uri}", timeout=120)
    assert proc.returncode != 0
    assert f"MLflow tracking store {uri} cannot be used" in proc.stderr, proc.stderr[-2000:]
    assert "Connection refused" in proc.stderr
    assert not (tmp_path / "outputs" / "data").exists()  # no data work was done
    print([line for line in proc.stderr.splitlines() if "cannot be used" in line][0][:300])


def test_sqlite_store_in_read_only_dir_fails_naming_the_uri(tmp_path, readonly_dir):
    from pipeline.job import run

    uri = f"sqlite:///{readonly_dir}/mlflow.db"
    cfg = compose_cfg(tmp_path, [f"tracking.uri={uri}"])
    with pytest.raises(TrackingError, match=rf"MLflow tracking store {uri} cannot be used: .*open database"):
        run(cfg)
    assert not Path(cfg.paths.data_dir).exists()


def test_existing_sqlite_store_made_read_only_fails_at_start(small_fs):
    uri = f"sqlite:///{small_fs}/mlflow.db"
    create = (
        f"from pipeline.tracking import prepare_store; prepare_store({uri!r}, 'pipeline', {str(small_fs)!r})"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-c", create], env=env, check=True, capture_output=True
    )  # no open handle here
    small_fs.readonly()
    with pytest.raises(TrackingError, match=rf"{uri} cannot be used: .*readonly database") as info:
        prepare_store(uri, "pipeline", str(small_fs / "art"))
    print(info.value)


def test_unwritable_artifact_location_fails_at_start(tmp_path, readonly_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(TrackingError, match=rf"{uri} cannot be used: .*{readonly_dir}"):
        prepare_store(uri, "pipeline", str(readonly_dir / "artifacts"))
