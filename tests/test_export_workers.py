"""Parallel exports (export.workers, export.engine): the same bytes for any number of workers and any engine,
bad files named whichever worker met them, bounded work in flight, a killed export rerun to the same content,
the CPUs a process may use, the config's rules, and ``pipeline-export``."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from omegaconf import OmegaConf

from pipeline import fsio, progress
from pipeline.config.validate import ConfigError, validate
from pipeline.data.engines import open_engine
from pipeline.data.engines.local import LocalEngine
from pipeline.data.export import export, export_name, open_export
from pipeline.data.integrity import load_file_list
from pipeline.data.sources.image_folder import ImageFolderError
from tests.conftest import REPO, compose_cfg, run_command
from tests.image_folders import BROKEN, make_image_folder

SYN = dict(
    name="synthetic",
    num_samples=700,
    shape=[12, 10, 3],
    num_classes=4,
    dtype="uint8",
    seed=5,
    noise=1.0,
    block_size=64,
)
STORAGES = {
    "shards": {"name": "shards", "dtype": "source", "shard_size_mb": 0.05, "placement_seed": 3},
    "encoded": {
        "name": "encoded",
        "dtype": "uint8",
        "codec": "png",
        "quality": None,
        "decoder": "imagecodecs",
        "shard_size_mb": 0.02,
        "placement_seed": 3,
    },
    "npy": {"name": "npy", "dtype": "source"},
    "memmap": {"name": "memmap", "dtype": "source"},
}


def _export_cfg(workers, engine="local", address=None):
    return OmegaConf.create({"workers": workers, "engine": engine, "address": address, "tasks_per_worker": 2})


def _content(exp) -> tuple[str, dict]:
    """content_sha256 and every data file's sha256 (the file list, less mtimes)."""
    files = load_file_list(exp.root, exp.manifest)
    return exp.manifest["content_sha256"], {rel: (size, sha) for rel, (size, _, sha) in files.items()}


@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_synthetic_export_is_the_same_bytes_for_one_two_and_three_workers(tmp_path, storage):
    src, sto = OmegaConf.create(SYN), OmegaConf.create(STORAGES[storage])
    built = {w: export(src, sto, tmp_path / f"w{w}", export_cfg=_export_cfg(w)) for w in (1, 2, 3)}
    assert {w: e.throughput["workers"] for w, e in built.items()} == {1: 1, 2: 2, 3: 3}
    assert built[1].throughput["engine"] == "serial" and built[2].throughput["engine"] == "local"
    reference = _content(built[1])
    assert len(reference[1]) >= 2  # labels and the samples' files
    for w in (2, 3):
        assert _content(built[w]) == reference, f"{w} workers wrote other bytes than the serial path"
        assert built[w].root.name == built[1].root.name  # the fingerprint ignores export.*
    np.testing.assert_array_equal(built[2].labels, built[1].labels)


def test_image_folder_in_workers_skips_the_broken_file_naming_it_and_matches_the_serial_export(
    tmp_path, caplog
):
    root = make_image_folder(tmp_path / "imgs", per_class=30)
    cfg = compose_cfg(
        tmp_path,
        ["source=image_folder", f"source.root={root}", "source.mode=RGB", "source.size=[20,24]",
         "source.chunk_size=8", "storage=encoded", "storage.codec=jpeg", "storage.quality=90",
         "storage.shard_size_mb=0.01"],
    )  # fmt: skip
    serial = export(cfg.source, cfg.storage, tmp_path / "serial", export_cfg=_export_cfg(1))
    caplog.clear()
    progress.configure({"bars": "false", "log_every_s": 0.02})  # progress lines, as where no one watches
    try:
        with caplog.at_level(logging.INFO):
            parallel = export(cfg.source, cfg.storage, tmp_path / "parallel", export_cfg=_export_cfg(2))
    finally:
        progress.configure({"bars": "auto", "log_every_s": None})
    assert str(root / BROKEN) in caplog.text  # the check ran in a worker; named here, then skipped
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]
    assert any(re.search(r"^export: \d+/90 samples .* samples/s, .* MB/s, ETA", line) for line in lines), (
        lines
    )
    assert parallel.spec.num_samples == serial.spec.num_samples == 90
    assert _content(parallel) == _content(serial)
    assert parallel.throughput["workers"] == 2 and parallel.throughput["samples_per_s"] > 0


def test_a_bad_file_fails_the_export_naming_it_whichever_worker_met_it(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=20)
    base = ["source=image_folder", f"source.root={root}", "source.chunk_size=4", "storage=npy"]
    cfg = compose_cfg(tmp_path, [*base, "source.on_error=fail"])
    with pytest.raises(ImageFolderError, match=rf"{BROKEN}.*source\.on_error=fail"):
        export(cfg.source, cfg.storage, tmp_path / "fail", export_cfg=_export_cfg(2))
    # a header that passes the listing check, data that does not decode: found by a worker while exporting
    (root / BROKEN).unlink()
    data = (root / "stripes" / "002.jpg").read_bytes()
    (root / "stripes" / "zz-cut.jpg").write_bytes(data[: len(data) * 2 // 3])  # a JPEG cut short
    cfg = compose_cfg(tmp_path, [*base, "source.check=header"])
    with pytest.raises(ImageFolderError, match=r"zz-cut\.jpg passed the listing check but cannot be decoded"):
        export(cfg.source, cfg.storage, tmp_path / "header", export_cfg=_export_cfg(2))
    assert not list((tmp_path / "header").glob("image_folder-*"))  # nothing published


def _pulled(items, log):
    for item in items:
        log.append(item)
        yield item


def test_work_in_flight_is_bounded_and_results_come_in_order():
    pulled: list[int] = []
    with LocalEngine(2, tasks_per_worker=3) as engine:
        for i, value in enumerate(engine.map(_square_after, _pulled(range(40), pulled), 0.002)):
            assert value == i * i
            assert len(pulled) - i <= engine.in_flight + 1  # never more than the window read ahead
    assert engine.in_flight == 6 and len(pulled) == 40


def _square_after(delay, i):
    time.sleep(delay * (i % 3))  # uneven tasks: results finish out of order
    return i * i


def test_worker_errors_reach_the_caller_as_raised():
    with LocalEngine(2) as engine, pytest.raises(ValueError, match="piece 7 is bad"):
        list(engine.map(_fail_on_7, range(20)))


def _fail_on_7(shared, i):
    if i == 7:
        raise ValueError(f"piece {i} is bad")
    return i


# ---- a real local Dask cluster ----------------------------------------------------------------------------


class _Listening:
    """The listening sockets of process ``pid`` and its descendants, and those processes, sampled while it
    runs."""

    def __init__(self, pid: int) -> None:
        import threading

        self.root = psutil.Process(pid)
        self.seen: set[tuple[str, int]] = set()
        self.procs: dict[int, psutil.Process] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                self.procs.update((p.pid, p) for p in self.root.children(recursive=True))
            except psutil.Error:
                return
            ours = {self.root.pid, *self.procs}
            self.seen |= {
                (c.laddr.ip, c.laddr.port)
                for c in psutil.net_connections("inet")
                if c.status == "LISTEN" and c.pid in ours
            }

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.mark.slow  # 5-8 s on 2 cores: a fresh process, Dask's import, a cluster of two spawned workers
def test_a_local_dask_cluster_exports_the_same_bytes_bound_to_localhost_and_is_stopped(tmp_path):
    """In a process of its own (as ``pipeline-export`` runs it): what the cluster starts is watched there."""
    src, sto = OmegaConf.create(SYN), OmegaConf.create(STORAGES["encoded"])
    serial = export(src, sto, tmp_path / "serial", export_cfg=_export_cfg(1))
    args = [json.dumps(SYN), json.dumps(STORAGES["encoded"]), json.dumps(dict(_export_cfg(2, engine="dask")))]
    proc = subprocess.Popen(
        [sys.executable, "-c", EXPORTER, *args, str(tmp_path / "dask")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE,
        text=True,
    )
    with _Listening(proc.pid) as listening:
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    on_dask = open_export(tmp_path / "dask" / serial.root.name)
    assert on_dask.throughput["engine"] == "dask" and on_dask.throughput["workers"] == 2
    assert _content(on_dask) == _content(serial)
    assert len(listening.seen) >= 3  # the scheduler and two workers at least
    assert {ip for ip, _ in listening.seen} == {"127.0.0.1"}, listening.seen
    assert len(listening.procs) >= 2  # the worker processes, seen while they ran
    _, alive = psutil.wait_procs(list(listening.procs.values()), timeout=10)
    assert not alive, f"the export's cluster outlived it: {alive}"


# ---- a killed export ------------------------------------------------------------------------------------

KILL_SYN = {**SYN, "num_samples": 4000, "shape": [20, 20, 3], "block_size": 100}
KILL_STORAGE = {**STORAGES["encoded"], "shard_size_mb": 0.5}
EXPORTER = """
import json, sys
from omegaconf import OmegaConf
from pipeline.data.export import export
src, sto, ecfg = (OmegaConf.create(json.loads(a)) for a in sys.argv[1:4])
export(src, sto, sys.argv[4], export_cfg=ecfg)
"""


def test_an_export_sigkilled_half_way_leaves_no_worker_and_reruns_to_the_same_content(tmp_path):
    src, sto = OmegaConf.create(KILL_SYN), OmegaConf.create(KILL_STORAGE)
    reference = export(src, sto, tmp_path / "reference", export_cfg=_export_cfg(2))  # = serial: tests above
    data_dir, name = tmp_path / "killed", export_name(src, sto)
    args = [json.dumps(KILL_SYN), json.dumps(KILL_STORAGE), json.dumps(dict(_export_cfg(2)))]
    proc = subprocess.Popen(
        [sys.executable, "-c", EXPORTER, *args, str(data_dir)], env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    pieces = -(-KILL_SYN["num_samples"] // KILL_SYN["block_size"])
    deadline = time.monotonic() + 60
    workers: list[psutil.Process] = []
    while time.monotonic() < deadline and proc.poll() is None:
        parts = list(data_dir.glob(f".tmp-{name}-*/encoded/parts/*.bin"))
        if len(workers) < 2:  # the pool forks its workers as tasks arrive
            workers = psutil.Process(proc.pid).children()
        if len(parts) >= pieces // 3:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the export ended before it could be killed half-way"
    assert len(parts) < pieces and len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers outlived the killed export: {alive}"
    assert not (data_dir / name).exists() and list(
        data_dir.glob(f".tmp-{name}-*")
    )  # half-written, unpublished
    assert not fsio.is_locked(data_dir / ".locks" / f"{name}.lock")  # no orphan holds the lock

    again = export(src, sto, data_dir, export_cfg=_export_cfg(2))
    assert not again.reused and not list(data_dir.glob(".tmp-*"))
    assert _content(open_export(again.root, verify=True)) == _content(reference)


# ---- the CPUs, the config, the command ------------------------------------------------------------------

CPUS = "from pipeline.system.cpus import usable_cpus; print(usable_cpus())"


def test_auto_workers_follow_affinity_and_the_cgroup_cpu_quota(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    one_cpu = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", CPUS], env=env, capture_output=True, text=True
    )
    assert one_cpu.stdout.strip() == "1", one_cpu.stderr
    assert open_engine(_export_cfg("auto")).workers == len(os.sched_getaffinity(0))
    group = Path("/sys/fs/cgroup/cpu") / f"pipeline-test-cpus-{os.getpid()}"
    try:
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")  # one CPU's time
    except OSError as err:
        pytest.skip(f"no v1 cpu cgroup to create here ({err})")
    try:
        code = f"open({str(group / 'cgroup.procs')!r}, 'w').write(str(__import__('os').getpid())); {CPUS}"
        capped = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert capped.stdout.strip() == "1", capped.stderr
    finally:
        group.rmdir()


@pytest.mark.parametrize(
    "override,match",
    [
        (["export.workers=0"], r"export\.workers=0 -- auto or an integer >= 1"),
        (["export.address=tcp://10.0.0.5:8786"], r"export\.address=.*set export\.engine=dask"),
        (["export.engine=dask", "export.address=ray://head:10001"], r"export\.address=.ray://.*tcp://"),
        (
            ["export.engine=dask", "export.address=/shared/cluster"],
            r"export\.address=.*Dask scheduler address",
        ),
        (["export.tasks_per_worker=0"], r"export\.tasks_per_worker=0"),
    ],
)
def test_bad_export_settings_are_named_before_any_work(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_cfg(tmp_path, override))


def test_pipeline_export_multirun_prepares_formats_that_the_job_then_reuses(tmp_path):
    from pipeline import stages

    overrides = ["source=synthetic", "source.num_samples=300", "source.dtype=uint8", "source.shape=[8,8,3]"]
    done = run_command(
        tmp_path,
        [sys.executable, "-m", "pipeline.cli_export", "-m", *overrides, "storage=shards,encoded"],
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    printed = [line for line in done.stdout.splitlines() if line.startswith(("export: ", "content_sha256: "))]
    assert len(printed) == 4 and "built in" in done.stdout
    digests = {line.split()[-1] for line in printed if line.startswith("content_sha256")}
    assert len(digests) == 1  # the same samples in both formats
    assert not list((tmp_path / "outputs" / "multiruns").glob("*/report"))  # no MLflow sweep: nothing trained
    for storage in ("shards", "encoded"):
        exp = stages.export_data(compose_cfg(tmp_path, [*overrides, f"storage={storage}"]))
        assert exp.reused and f"export: {exp.root}" in printed
        assert exp.manifest["content_sha256"] in digests
