"""What pipeline-tune measures: the CPU quota of a real cgroup, the disk, the typical rate of a window, and
trials of the real training step (a window, a duel)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import stages
from pipeline.tune import facts
from pipeline.tune.space import Candidate
from pipeline.tune.trials import Trials, typical_rate
from tests.conftest import REPO, compose_cfg

CPU_ROOT = Path("/sys/fs/cgroup/cpu")  # cgroup v1 (this machine); v2 groups are tried below


def _cpu_group(tmp_name: str, quota_us: int, period_us: int = 100_000) -> Path:
    """A real CPU-capped cgroup (v1 cpu controller or v2 cpu.max); skips where none can be made."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.exists() and "cpu" in v2.read_text().split():
        group = Path("/sys/fs/cgroup") / tmp_name
        setting = (group / "cpu.max", f"{quota_us} {period_us}")
    elif (CPU_ROOT / "cpu.cfs_quota_us").exists():
        group = CPU_ROOT / tmp_name
        setting = None
    else:
        pytest.skip("no cgroup cpu controller here")
    try:
        group.mkdir()
        if setting is None:
            (group / "cpu.cfs_period_us").write_text(str(period_us))
            (group / "cpu.cfs_quota_us").write_text(str(quota_us))
        else:
            setting[0].write_text(setting[1])
    except OSError as err:
        if group.exists():
            group.rmdir()
        pytest.skip(f"cannot make a CPU-capped cgroup: {err}")
    return group


def test_cpu_limit_reads_the_quota_of_the_group_a_process_is_in():
    from pipeline.system.cgroups import cpu_limit

    assert cpu_limit() is None or cpu_limit() > 0
    group = _cpu_group(f"pipeline-test-cpu-{os.getpid()}", quota_us=50_000)  # half a CPU
    try:
        code = (
            "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid()));"
            "from pipeline.system.cgroups import cpu_limit; print(cpu_limit())"
        )
        # the child moves itself in before it reads the limit
        out = subprocess.run(
            [sys.executable, "-c", code, str(group / "cgroup.procs")],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert float(out.stdout.strip()) == pytest.approx(0.5)
        assert facts.job_cores(4, 0.5) == 1 and facts.job_cores(4, 2.5) == 2 and facts.job_cores(4, None) == 4
    finally:
        group.rmdir()


def test_disk_and_data_facts_of_a_real_export(tmp_path):
    cfg = compose_cfg(tmp_path, ["source=synthetic", "source.num_samples=3000", "storage=memmap"])
    exp = stages.export_data(cfg)
    d = facts.data(cfg, exp, stages.split_data(cfg, exp))
    assert d.storage == "memmap" and d.num_train == 2400 and d.sample_bytes == 62 * 47 * 4
    assert not d.decoded and not d.per_sample_work and d.fits_cache
    assert d.export_mb == pytest.approx(exp.manifest["files"]["bytes"] / 1e6)
    k = facts.disk(exp)
    assert k.file == "samples.npy" and k.sequential_mb_per_s > 0 and k.random_reads_per_s > 0
    f = facts.Facts(facts.machine(), d, disk=k, load_ms=1.0, step_ms=3.0, batch_size=64)
    names = [name for name, _v, _w in f.rows()]
    assert names[:5] == ["cores", "memory", "device", "data", "per-sample work"] and "load share" in names
    assert f.load_share == pytest.approx(0.25)
    assert f.params()["fact.machine.fingerprint"] == f.machine.fingerprint()


def test_the_typical_rate_is_the_median_of_slices():
    # 10 batches of 64 every 0.1 s (640 samples/s), then a stall of 2 s, then 10 more every 0.1 s
    stamps = [(0.1 * i, 64) for i in range(10)] + [(2.9 + 0.1 * i, 64) for i in range(10)]
    assert typical_rate(stamps, end=3.9, slice_s=0.5) == pytest.approx(640, rel=0.05)
    assert typical_rate(stamps[:3], end=0.3, slice_s=0.5) == 0.0  # too short for three slices


def test_a_trial_and_a_duel_run_the_real_step(tmp_path):
    cfg = compose_cfg(tmp_path, ["model.hidden=[32]", "loader.batch_size=128"])
    exp = stages.export_data(cfg)
    trials = Trials(cfg, torch.device("cpu"), {"shards": (exp, stages.split_data(cfg, exp))})
    serial, prefetch = Candidate("shards", "mapped", 0, 0, 0), Candidate("shards", "mapped", 0, 0, 2)
    t = trials.run(serial, seconds=0.5, warmup_s=0.2)
    assert t.ok and t.samples > 0 and t.samples_per_s > 0 and 0 <= t.data_wait < 1
    load_ms, step_ms = trials.serial_figures(serial, seconds=0.2)
    assert load_ms > 0 and step_ms > 0
    duel = trials.duel(serial, prefetch, seconds=1.0, round=1, warmup_s=0.2, turn_s=0.2, settle_s=0.1)
    assert duel.a.ok and duel.b.ok and len(duel.ratios) >= 2 and duel.gain is not None
    assert duel.a.stage == duel.b.stage == "duel" and duel.b.candidate == prefetch
    bad = trials.run(Candidate("ram", None, 0, 0, 0), seconds=0.5)  # no ram export: a failed trial
    assert not bad.ok and "ram" in bad.error
