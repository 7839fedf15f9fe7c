"""The repository's benchmarks/ (not installed): each runs on a tiny input and prints its figures beside its
baseline. benchmarks.readers has its own test (tests/test_bench_readers.py)."""

from __future__ import annotations

import csv
import sys

import pytest

from tests.conftest import run_command


def test_codecs_bench_prints_every_codec_beside_pillow(capsys):
    from benchmarks import codecs

    codecs.main(["--shapes", "16x16", "--num-samples", "20", "--seconds", "0.1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    pillow = [r for r in rows if r[-9] == "codec.py:pillow"]
    assert len(pillow) == 4  # png, lossless webp, webp q90, jpeg q90
    assert all(r[-7] == "1.00x" for r in pillow)  # the baseline, measured in the same rounds
    ours = {" ".join(r[1:-9]): r for r in rows if r[-9] == "codec.py:imagecodecs"}
    assert set(ours) == {"png", "webp lossless", "webp q90", "jpeg q90"}
    assert ours["png"][-2] == "True" and ours["jpeg q90"][-2] == "False"  # exact: lossless only
    assert all(r[-1] == "True" for r in ours.values())  # the same pixels as Pillow


@pytest.mark.slow  # ~3 s of a benchmark's output
def test_augment_bench_prints_each_setting_against_none(tmp_path):
    args = ["--num-samples", "300", "--passes", "1", "--data-dir", str(tmp_path / "data")]
    proc = run_command(tmp_path, [sys.executable, "-m", "benchmarks.augment", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [
        line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["none"], ["flip_crop"])
    ]
    assert {(r[0], r[1], r[2]) for r in rows} == {
        (where, w, t) for where in ("none", "flip_crop") for w, t in (("0", "0"), ("0", "2"), ("2", "0"))
    }
    assert all(r[4] == "1.00x" for r in rows if r[0] == "none")
    assert "the op alone" in proc.stdout


def test_photos_writes_an_image_folder_the_source_reads(tmp_path):
    proc = run_command(
        tmp_path, [sys.executable, "-m", "benchmarks.photos", str(tmp_path / "photos"), "--num-samples", "12"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted((tmp_path / "photos").glob("*/*.png"))
    assert len(files) == 12 and {f.parent.name for f in files} <= {"china", "flower", "grace_hopper"}


@pytest.mark.slow  # one real `python -m pipeline` job
def test_memory_bench_runs_a_job_per_format_and_size(tmp_path):
    out = tmp_path / "mem"
    args = ["--sizes", "400", "--formats", "memmap", "--out", str(out)]
    proc = run_command(tmp_path, [sys.executable, "-m", "benchmarks.memory", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "memory_scaling.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["format"] == "memmap" and row["samples"] == "400"
    assert float(row["peak_used_mb"]) > 0 and float(row["used_vs_smallest"]) == 1.0
    assert (out / "memory_scaling.png").read_bytes()[:4] == b"\x89PNG"
