"""python -m benchmarks.readers: every point runs in its own process and lands in the table."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import run_command


@pytest.mark.slow  # ~15 s: one child process per point, each imports torch
def test_warm_reader_bench_prints_every_point(tmp_path):
    points = ["memmap", "memmap-plain", "shards-memory", "shards-mapped"]
    args = ["--samples", "500", "--warm-only", "--passes", "1", "--data-dir", str(tmp_path / "data")]
    proc = run_command(tmp_path, [sys.executable, "-m", "benchmarks.readers", *args, "--points", *points])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    for point in points:
        assert "warm" in rows[point] and "failed" not in rows[point], proc.stdout
        assert float(rows[point].split("|")[3].replace(",", "")) > 0
