"""Several real processes racing on one export: exactly one builds it, all read the same bytes."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import queue
import time
from pathlib import Path

import numpy as np

PROCESSES = 4
NUM_SAMPLES = 800  # one torch.save file per sample: the build takes long enough to overlap


def _configs(storage: str):
    from omegaconf import OmegaConf

    from pipeline.data.sources.synthetic import SyntheticConfig
    from pipeline.data.storage.npy import NpyConfig as NpyStorageConfig
    from pipeline.data.storage.pt import PtConfig as PtStorageConfig

    source = OmegaConf.structured(SyntheticConfig(num_samples=NUM_SAMPLES, shape=[8, 8], num_classes=5))
    fmt = PtStorageConfig() if storage == "pt" else NpyStorageConfig()
    return source, OmegaConf.structured(fmt)


def _digest_of(dataset) -> str:
    h = hashlib.sha256()
    for i in range(len(dataset)):
        x, y = dataset[i]
        h.update(np.ascontiguousarray(x.numpy()).tobytes())
        h.update(int(y).to_bytes(8, "little"))
    return h.hexdigest()


def _racer(data_dir: str, storage: str, log_path: str, barrier, results) -> None:
    from pipeline.data.export import export

    handler = logging.FileHandler(log_path)
    logging.getLogger("pipeline.data.export").addHandler(handler)
    logging.getLogger("pipeline.data.export").setLevel(logging.INFO)
    source, fmt = _configs(storage)
    barrier.wait()  # everyone asks for the export at the same moment
    exp = export(source, fmt, data_dir)
    ids = np.arange(exp.spec.num_samples)
    results.put((str(exp.root), exp.reused, exp.manifest["content_sha256"], _digest_of(exp.dataset(ids))))


def _race(tmp_path: Path, storage: str):
    ctx = mp.get_context("fork")  # separate processes, each with its own lock file handle
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    data_dir = tmp_path / "data"
    logs = [tmp_path / f"racer{i}.log" for i in range(PROCESSES)]
    procs = [
        ctx.Process(target=_racer, args=(str(data_dir), storage, str(logs[i]), barrier, results))
        for i in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    out = []
    deadline = time.monotonic() + 240
    while len(out) < PROCESSES:
        try:
            out.append(results.get(timeout=0.5))
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not failed and time.monotonic() < deadline, f"racers exited with {failed}"
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return data_dir, out, [log.read_text() for log in logs]


def _source_digest(storage: str) -> str:
    from pipeline.data.sources import build_source

    source, _ = _configs(storage)
    h = hashlib.sha256()
    for x, y in build_source(source).chunks():
        for xi, yi in zip(np.asarray(x, dtype=np.float32), y):
            h.update(np.ascontiguousarray(xi).tobytes())
            h.update(int(yi).to_bytes(8, "little"))
    return h.hexdigest()


def test_racing_processes_build_one_export_and_read_the_same_bytes(tmp_path):
    data_dir, out, logs = _race(tmp_path, "pt")

    roots = {root for root, *_ in out}
    assert len(roots) == 1
    assert sorted(reused for _, reused, *_ in out) == [False] + [True] * (PROCESSES - 1)
    builds = sum(text.count("export: writing") for text in logs)
    assert builds == 1, logs
    print("racers that waited for the lock:", sum("waiting for another process" in t for t in logs))
    assert sum(text.count("export: reusing") for text in logs) == PROCESSES - 1
    # every process read every sample back, and they all saw exactly the source's bytes
    assert {content for _, _, content, _ in out} == {out[0][2]}
    assert {digest for *_, digest in out} == {_source_digest("pt")}
    # one published folder, no temporary build left behind
    published = [p.name for p in data_dir.iterdir() if not p.name.startswith(".locks")]
    assert published == [Path(out[0][0]).name]
    assert len(list(Path(out[0][0]).glob("**/*.pt"))) == NUM_SAMPLES
