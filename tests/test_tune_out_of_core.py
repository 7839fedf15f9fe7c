"""pipeline-tune out of core (slow): data twice a memory cgroup's limit. The tune never picks a setting that
collapses, and its pick is within 10% of the best of an exhaustive sweep of the same space run here."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from pipeline.data.export import export
from pipeline.system.cgroups import CgroupUnavailable, MemoryCgroup
from pipeline.system.page_cache import drop
from pipeline.tune import facts, record, space
from pipeline.tune.trials import Trials
from tests.conftest import run_command
from tests.test_out_of_core import LIMIT_MB, NUM_SAMPLES, SAMPLE_BYTES
from tests.test_tune import compose_tune

MiB = 2**20
JOB = [
    "source=synthetic",
    f"source.num_samples={NUM_SAMPLES}",  # 1.69 GB of LFW-shaped float32: over twice the limit
    "source.num_classes=10",
    "split.stratify=false",
    "storage=shards",
    "storage.shard_size_mb=16",
    "model=mlp",
    "model.hidden=[64]",
    "loader.batch_size=256",
    "tracking.log_model=false",
    "progress=false",
]
STORAGES = ["shards", "memmap"]
SWEEP_WINDOW_S = 4.0


@pytest.mark.slow
def test_out_of_core_the_tune_never_collapses_and_is_near_the_exhaustive_best(tmp_path):
    cfg = compose_tune(tmp_path, [*JOB, "tune.storages=[shards,memmap]"])
    exports = {}
    for name in STORAGES:  # exported here, outside the cgroup; each trial drops its pages itself
        trials = Trials(cfg, None, {})
        exp = export(cfg.source, trials.storage_cfg(name), cfg.paths.data_dir)
        drop(exp.root, method="fadvise")
        assert exp.spec.num_samples * SAMPLE_BYTES >= 2 * LIMIT_MB * MiB
        exports[name] = exp
    cg = MemoryCgroup(LIMIT_MB * MiB, prefix="pipeline-test")
    try:
        try:
            cg.__enter__()  # this process moves in: the CLI it starts runs inside from its first byte
        except CgroupUnavailable as err:
            pytest.skip(f"no memory cgroup here: {err}")
        try:
            argv = [sys.executable, "-m", "pipeline.tune", *JOB, "tune.budget_s=60", "tune.storages=[memmap]"]
            proc = run_command(tmp_path, [*argv, f"tune.output={tmp_path}/tuned.yaml"], timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            pick = _pick(cfg, exports)
            sweep = _sweep(cfg, exports)  # in this process, inside the same cgroup
            best = max(
                (t for t in sweep if t.ok and not space.collapses(t.read_amplification)), key=lambda t: t.rate
            )
            mine = next(t for t in sweep if t.candidate == pick)
            duel = None
            if pick != best.candidate:  # side by side: a shared machine's load falls on both alike
                duel = Trials(cfg, torch.device("cpu"), _pairs(cfg, exports), cold=True).duel(
                    best.candidate, pick, 30.0, round=1
                )
        finally:
            cg.__exit__(None, None, None)
        table = "\n".join(
            f"  {t.candidate.label():<45} {t.rate:>9,.0f} samples/s  read amp "
            f"{t.read_amplification if t.read_amplification is not None else float('nan'):.2f}"
            + ("  <- the tune's pick" if t.candidate == pick else "")
            for t in sorted(sweep, key=lambda t: -t.rate)
        )
        said = (
            f"tune picked {pick.label()}; sweep best {best.candidate.label()} ({best.rate:,.0f}/s); "
            f"pick in the sweep {mine.rate:,.0f}/s, read amp {mine.read_amplification}; "
            f"duel {duel.ratios if duel else 'none (the same setting)'}; cgroup peak {cg.peak_mb:.0f} MB, "
            f"{cg.oom_kills} OOM kills\n{table}"
        )
        print(said)  # the figures, for the log (pytest -s)
        assert cg.oom_kills == 0, said
        assert mine.ok and not space.collapses(mine.read_amplification), said
        if duel is not None:
            assert duel.gain is not None and duel.gain >= -0.10, said
    finally:
        for exp in exports.values():
            shutil.rmtree(exp.root, ignore_errors=True)  # 1.69 GB each


def _pairs(cfg, exports) -> dict:
    from pipeline.data.partition import partition

    return {name: (exp, partition(exp.labels, cfg.split)) for name, exp in exports.items()}


def _pick(cfg, exports) -> space.Candidate:
    """The tune's answer, from its record (the settings of the export it chose)."""
    machine = facts.machine(facts.device_name(torch.device("cpu")))
    for name, exp in exports.items():
        found = record.read(cfg.paths.outputs, machine.fingerprint(), exp.fingerprint, record.shape_of(cfg))
        if found is not None:
            s = found["settings"]
            return space.Candidate(
                s["storage"],
                s.get("storage.buffers"),
                int(s["loader.num_workers"]),
                int(s["loader.decode_threads"]),
                int(s["loader.thread_prefetch"]),
            )
    raise AssertionError("the tune left no record")


def _sweep(cfg, exports) -> list:
    """Every candidate of the tune's space, rules ignored, one cold window each."""
    from pipeline.data.partition import partition

    exp = exports["shards"]
    split = partition(exp.labels, cfg.split)
    f = facts.Facts(facts.machine(), facts.data(cfg, exp, split))
    trials = Trials(cfg, torch.device("cpu"), _pairs(cfg, exports), cold=True)
    return [trials.run(c, SWEEP_WINDOW_S, warmup_s=1.0) for c in dict.fromkeys(space.grid(cfg, f, STORAGES))]
