"""The memory sampler's figures, the MLflow record of a real run, and the copy-on-read guard."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config.schema import LoaderConfig
from pipeline.data.sources import SampleSpec
from pipeline.data.storage import ram
from pipeline.system.memory import MemorySampler, snapshot
from pipeline.training.loading import build_loader
from tests.conftest import compose_cfg, sqlite_uri

MB = 1024 * 1024


def test_allocation_shows_in_used_mb_not_in_mapped_file():
    before = snapshot()
    block = np.ones(200 * MB // 8)  # 200 MB, every page written
    after = snapshot()
    del block
    assert 180 < after.used_mb - before.used_mb < 220
    assert abs(after.mapped_file_mb - before.mapped_file_mb) < 20
    assert after.workers == before.workers and after.system_used_mb > 0 and after.system_available_mb > 0
    assert after.cuda_allocated_mb is None  # no CUDA device given


def test_mapped_file_pages_show_in_mapped_file_mb_not_in_used_mb(tmp_path):
    path = tmp_path / "big.bin"
    np.ones(150 * MB // 8).tofile(path)
    before = snapshot()
    mm = np.memmap(path, dtype=np.float64, mode="r")
    assert float(mm.sum()) == len(mm)  # touches every page of the map
    after = snapshot()
    del mm
    assert 130 < after.mapped_file_mb - before.mapped_file_mb < 170
    assert abs(after.used_mb - before.used_mb) < 20


def test_sampler_series_peaks_and_epoch_marks():
    with MemorySampler(interval_s=0.02) as mem:
        mem.mark_epoch(0)
        block = np.ones(100 * MB // 8)
        first = mem.take_epoch()
        del block
        mem.take_epoch()  # the thread may have sampled the block between take_epoch() and del
        mem.mark_epoch(1)
        second = mem.take_epoch()
        rows = mem.drain()
    # per-epoch windows; the main process's own figure: DataLoader workers left by earlier tests in this
    # process may exit meanwhile and move the total
    assert first["used_main_mb"] > second["used_main_mb"] + 80
    assert mem.peak["used_main_mb"] >= first["used_main_mb"]
    assert [i for i, _ in rows] == list(range(len(rows))) and len(rows) >= 3
    assert len(mem.drain()) == len(mem.samples) - len(rows)  # only what came after
    assert [e for e, _ in mem.epoch_marks] == [0, 1]
    assert mem.peak["min_system_available_mb"] > 0


def test_budget_flag_raises_with_budget_and_measured_figure():
    from pipeline.system.memory import MemoryBudgetExceeded

    mem = MemorySampler(budget_mb=1.0)
    mem.check()  # nothing sampled yet
    mem.sample()
    with pytest.raises(MemoryBudgetExceeded, match=r"trainer\.memory_budget_mb=1 MB") as err:
        mem.check("in epoch 3")
    assert f"reached {mem.exceeded.used_mb:.1f} MB" in str(err.value) and "in epoch 3" in str(err.value)


def test_every_run_records_series_peaks_and_timeline(tmp_path):
    from pipeline.job import run

    overrides = ["storage=npy", "trainer.epochs=2", "trainer.memory_interval_s=0.05", "loader.num_workers=2"]
    run(compose_cfg(tmp_path, overrides))
    client = MlflowClient(sqlite_uri(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert run.info.status == "FINISHED"
    series = sorted(client.get_metric_history(run.info.run_id, "memory/used_mb"), key=lambda m: m.step)
    assert len(series) >= 4
    assert [m.step for m in series] == list(range(len(series)))  # one point per sample, none twice
    assert all(100 < m.value < 5000 for m in series), [(m.step, m.value) for m in series]
    workers = client.get_metric_history(run.info.run_id, "memory/workers")
    assert max(m.value for m in workers) >= 2  # DataLoader workers were sampled
    for key in ("uss_workers_mb", "uss_main_mb", "mapped_file_mb", "system_available_mb", "rss_main_mb"):
        assert len(client.get_metric_history(run.info.run_id, f"memory/{key}")) == len(series)
    metrics = run.data.metrics
    assert metrics["memory/peak_used_mb"] == max(m.value for m in series)
    assert metrics["memory/peak_uss_workers_mb"] > 0
    assert len(client.get_metric_history(run.info.run_id, "memory/epoch_peak_used_mb")) == 2
    files = {a.path for a in client.list_artifacts(run.info.run_id, "memory")}
    assert files == {"memory/memory_timeline.png", "memory/memory_timeline.csv"}
    png = client.download_artifacts(run.info.run_id, "memory/memory_timeline.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _worker_uss_per_epoch(dataset, epochs: int = 3) -> list[float]:
    """USS of the 2 persistent workers together, sampled at the end of each epoch."""
    cfg = LoaderConfig(
        num_workers=2, pin_memory="false", persistent_workers=True, multiprocessing_context="fork"
    )
    import psutil

    earlier = {c.pid for c in psutil.Process().children()}  # another test's loader, not yet collected
    loader = build_loader(dataset, cfg, seed=0, train=True, device=torch.device("cpu"))
    out = []
    for _ in range(epochs):
        for _batch in loader:
            pass
        workers = [c for c in psutil.Process().children() if c.pid not in earlier]
        assert len(workers) == 2
        out.append(sum(c.memory_full_info().uss for c in workers) / 2**20)
    loader.close()
    return out


class _PythonObjects(torch.utils.data.Dataset):
    """The anti-pattern: one Python object per sample; reading one writes its refcount."""

    def __init__(self, n: int) -> None:
        self.items = [bytes(4000) + i.to_bytes(4, "little") for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return torch.zeros(4), len(self.items[i]) % 2


@pytest.mark.skipif(sys.platform != "linux", reason="fork + /proc")
def test_copy_on_read_guard_worker_uss_flat_over_epochs(tmp_path):
    n = 20_000  # 233 MB held by the main process, read by 2 forked persistent workers
    spec = SampleSpec(n, (62, 47), "float32", 10, tuple(str(c) for c in range(10)))
    writer = ram.Writer(tmp_path, spec, None)
    writer.write(np.random.default_rng(0).random((n, 62, 47), dtype=np.float32), None)
    writer.close()
    uss = _worker_uss_per_epoch(ram.Dataset(tmp_path, spec, np.arange(n) % 10, np.arange(n)))
    assert uss[2] - uss[0] < 5.0, f"workers' USS grew over epochs: {uss} MB"


@pytest.mark.skipif(sys.platform != "linux", reason="fork + /proc")
def test_copy_on_read_guard_catches_python_object_datasets():
    """The same measurement fails for a dataset of Python objects: the guard can fail."""
    uss = _worker_uss_per_epoch(_PythonObjects(20_000))
    assert uss[2] - uss[0] > 20.0, uss


def test_the_sampler_samples_on_request_off_the_callers_thread_and_within_its_cpu_share():
    from pipeline.system.memory import MAX_CPU_SHARE, MemorySampler

    with MemorySampler(interval_s=60) as sampler:  # the thread alone would not sample for a minute
        assert len(sampler.samples) == 1
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            sampler.sample_soon()  # a new process (a worker started): sampled by the thread
            deadline = time.monotonic() + 10
            while len(sampler.samples) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(sampler.samples) == 2 and sampler.samples[-1].workers >= 1
            sampler.sample_soon()  # the same processes (persistent workers): nothing new to read
            time.sleep(0.3)
            assert len(sampler.samples) == 2
        finally:
            child.kill()
            child.wait()
    fast = MemorySampler(interval_s=1e-6)
    fast.sample()  # a real reading of /proc: far more than 1 µs
    assert fast.cost_s > 0 and fast.wait_s() == fast.cost_s / MAX_CPU_SHARE > fast.interval_s
