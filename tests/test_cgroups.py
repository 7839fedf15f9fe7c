"""Real memory cgroups: the limit a process reads, OOM kills counted, groups removed; storage=ram's check."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from pipeline.data.sources import SampleSpec
from pipeline.data.storage.ram import check_fits
from pipeline.system.cgroups import CgroupUnavailable, MemoryCgroup, memory_limit
from pipeline.system.headroom import DoesNotFit, headroom
from pipeline.system.memory import MB
from tests.conftest import compose_cfg, sqlite_uri

PREFIX = "pipeline-test"


def capped(limit_bytes: int, **kwargs) -> MemoryCgroup:
    """A MemoryCgroup already entered; the test skips, saying why, where none can be created."""
    cg = MemoryCgroup(limit_bytes, prefix=PREFIX, **kwargs)
    try:
        return cg.__enter__()
    except CgroupUnavailable as err:
        pytest.skip(f"no memory cgroup here: {err}")


def _own_group() -> str:
    with open("/proc/self/cgroup") as fh:
        return fh.read()


def test_limit_is_read_inside_and_the_group_is_removed():
    outside, home = memory_limit(), _own_group()
    cg = capped(300 * MB)
    try:
        assert memory_limit() == 300 * MB if outside is None else min(outside, 300 * MB)
        assert _own_group() != home
        path = cg.path
    finally:
        cg.__exit__(None, None, None)
    assert _own_group() == home and memory_limit() == outside
    assert not path.exists()


def test_oom_kill_of_a_process_in_the_group_is_counted():
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.readline(); x = bytearray(200 << 20); print(len(x))"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        cg = capped(64 * MB, pid=child.pid)
        path = cg.path
        try:
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.wait(timeout=60) == -9  # SIGKILL from the OOM killer
        finally:
            cg.__exit__(None, None, None)
    finally:
        if child.poll() is None:
            child.kill()
    assert cg.oom_kills == 1 and cg.peak_bytes >= 60 * MB
    assert cg.path is None and not list(path.parent.glob(path.name))  # removed


def test_unwritable_hierarchy_is_explained():
    if os.geteuid() != 0:
        with pytest.raises(CgroupUnavailable, match="needs root"):
            MemoryCgroup(64 * MB, prefix=PREFIX).__enter__()
    else:
        with pytest.raises(ValueError, match="limit_bytes=0"):
            MemoryCgroup(0)


def test_headroom_is_the_lower_figure_and_names_both():
    h = headroom()
    assert 0 < h.bytes <= h.available_bytes
    spec = SampleSpec(num_samples=10, shape=(62, 47), dtype="float32", num_classes=2, class_names=("a", "b"))
    too_many = h.available_bytes // spec.sample_bytes + 100_000  # over MemAvailable: nothing is allocated
    with pytest.raises(
        DoesNotFit, match=r"storage=ram.*MemAvailable [\d,]+ MB.*storage=memmap or storage=shards"
    ):
        check_fits(spec, too_many)
    check_fits(spec, 10)


def test_ram_job_over_the_cgroup_limit_fails_before_loading_and_its_run_is_failed(tmp_path):
    from pipeline.job import run

    cfg = compose_cfg(
        tmp_path,
        ["storage=ram", "source=synthetic", "source.num_samples=2000", "tracking.log_model=false"],
    )
    used = headroom().used_bytes
    # the limit leaves this process 8 MB more than it holds; the 22 MB of data do not fit in that
    cg = capped(used + 8 * MB)
    try:
        with pytest.raises(DoesNotFit) as err:
            run(cfg)
    finally:
        cg.__exit__(None, None, None)
    message = str(err.value)
    assert "storage=ram would load 2,000 samples" in message and "22 MB" in message
    assert "cgroup memory limit" in message and "MemAvailable" in message and "storage=memmap" in message
    client = MlflowClient(sqlite_uri(tmp_path))
    (exp,) = [e for e in client.search_experiments() if e.name == "pipeline"]
    (mlrun,) = client.search_runs([exp.experiment_id])
    assert mlrun.info.status == "FAILED" and "DoesNotFit" in mlrun.data.tags["error"]
    assert "memory/epoch_peak_used_mb" not in mlrun.data.metrics  # no epoch ran
    assert cg.oom_kills == 0
