"""The batch hand-off (pipeline/training/handoff/): the same batches for any worker or decode-thread count in
every format, slots never overwritten while a batch is referenced, a full ring falls back instead of
waiting, workers' errors and deaths reach the main process, early exits leave the next pass whole."""

from __future__ import annotations

import gc
import logging

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pipeline.config.schema import LoaderConfig
from pipeline.data.storage import formats, get_format
from pipeline.training.handoff.slots import FREE, HANDED, SlotRings
from pipeline.training.loading import build_loader
from pipeline.training.transforms import Augment
from tests.run_helpers import epochs, same_batches
from tests.test_storage_formats import STORAGE_CFG, random_data, write_format

CPU = torch.device("cpu")
N = 90


def _dataset(tmp_path, name: str, buffers: str | None = None):
    rng = np.random.default_rng(4)
    x, y = random_data(rng, N, (6, 5), "uint8")
    cfg = dict(STORAGE_CFG[name])
    if buffers is not None:
        cfg["buffers"] = buffers
    spec, scfg = write_format(tmp_path / f"{name}-{buffers}", name, x, y, cfg=cfg)
    ids = np.sort(rng.choice(N, size=70, replace=False))
    return get_format(name).dataset(tmp_path / f"{name}-{buffers}", spec, y, ids, scfg), x, ids


def _loader(ds, transform=None, **kw):
    cfg = OmegaConf.structured(LoaderConfig(batch_size=16, pin_memory="false", **kw))
    return build_loader(ds, cfg, seed=11, train=True, device=CPU, transform=transform)


CASES = [
    (name, None) for name in sorted(formats()) if name in STORAGE_CFG and name not in ("shards", "encoded")
]
CASES += [(name, b) for name in ("shards", "encoded") for b in ("memory", "mapped")]


@pytest.mark.parametrize("name,buffers", CASES)
def test_every_format_gives_the_same_batches_for_any_workers_and_decode_threads(tmp_path, name, buffers):
    """Batches of epochs 0 and 1 (shuffle and per-sample augmentation) are bitwise those of 0 workers and 1
    thread, for 1, 2 and 4 workers, decode threads, and both together."""
    ds, _, _ = _dataset(tmp_path, name, buffers)
    aug = Augment(flip=True, padding=1)
    ref = epochs(_loader(ds, aug))
    assert sum(len(y) for _, y in ref[0]) == len(ds)
    for kw in (
        dict(num_workers=1),
        dict(num_workers=2),
        dict(num_workers=4, persistent_workers=True),
        dict(decode_threads=3),
        dict(num_workers=2, decode_threads=2),
    ):
        loader = _loader(ds, aug, **kw)
        assert same_batches(epochs(loader), ref), kw
        loader.close()


def test_kept_batches_are_never_overwritten_and_a_full_ring_falls_back(tmp_path, caplog):
    """A training loop that keeps every batch (and views of them) holds every slot: the workers must not
    reuse one, so they hand the later batches over the stock way (said once) -- all batches stay intact."""
    ds, _, _ = _dataset(tmp_path, "shards", "mapped")
    ref = epochs(_loader(ds))
    loader = _loader(ds, num_workers=2, prefetch_factor=1)
    with caplog.at_level(logging.WARNING, logger="pipeline.training.handoff.slots"):
        kept = []
        for _ in range(2):
            kept.append([(x, y, x[1:3]) for x, y in loader])  # tensors and views, never copied
            gc.collect()
    assert same_batches([[(x, y) for x, y, _ in e] for e in kept], ref)
    assert all(torch.equal(v, x[1:3]) for e in kept for x, _, v in e)
    assert loader.rings._fallbacks > 0
    assert sum("every slot of its ring in use" in r.getMessage() for r in caplog.records) == 1
    loader.close()


def test_a_slot_is_free_again_only_when_every_view_of_its_batch_is_gone():
    rings = SlotRings(workers=1, slots=2, shape=(3, 4), dtype="float32", batch_size=5)
    x, y = rings.arrays(0, 1, 5)
    x[...] = np.arange(60, dtype=np.float32).reshape(5, 3, 4)
    y[...] = np.arange(5)
    rings.publish(0, 1, 5)
    xt, yt = rings.take_slot(0, 1, 5)
    assert xt.shape == (5, 3, 4) and torch.equal(yt, torch.arange(5)) and xt[4, 2, 3] == 59
    view = xt[2]  # a view keeps the slot
    del xt, yt
    gc.collect()
    assert rings.state[1] == HANDED
    assert view[0, 0] == 24
    del view
    gc.collect()
    assert rings.state[1] == FREE


def test_a_worker_error_is_raised_with_its_type_naming_the_sample(tmp_path):
    """A corrupted encoded record read in a worker: the main process raises the worker's SampleReadError
    (naming the shard and the sample), with the worker's traceback as its cause."""
    from pipeline.data.integrity import SampleReadError
    from pipeline.training.handoff.pool import WorkerError

    ds, _, _ = _dataset(tmp_path, "encoded", "mapped")
    path = ds.files[0].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    loader = _loader(ds, num_workers=2)
    with pytest.raises(SampleReadError, match=str(path)) as info:
        for _ in loader:
            pass
    assert isinstance(info.value.__cause__, WorkerError) and "Traceback" in str(info.value.__cause__)


@pytest.mark.parametrize("persistent", [False, True])
def test_a_pass_left_early_leaves_the_next_one_whole(tmp_path, persistent):
    ds, _, _ = _dataset(tmp_path, "shards", "memory")
    ref = epochs(_loader(ds), 3)
    loader = _loader(ds, num_workers=2, persistent_workers=persistent)
    first = []
    for k, (x, y) in enumerate(loader):
        first.append((x.clone(), y.clone()))
        if k == 1:
            break
    assert same_batches([first], [ref[0][:2]])
    assert same_batches(epochs(loader, 2), ref[1:])  # epochs advance as passes start, as for 0 workers
    loader.close()


def test_spawned_workers_share_the_rings_and_buffers(tmp_path):
    """With ``multiprocessing_context=spawn`` the workers get the slots and shards' shared buffers through
    torch's shared-memory pickling, not by inheritance: still the same batches."""
    ds, _, _ = _dataset(tmp_path, "shards", "memory")
    ref = epochs(_loader(ds), 1)
    loader = _loader(ds, num_workers=1, multiprocessing_context="spawn")
    assert same_batches(epochs(loader, 1), ref)
    loader.close()


def test_decode_threads_split_a_batch_only_where_reading_a_sample_is_work(tmp_path):
    """A gather of fixed-size rows is read in one piece (threads would cost more than they share); decoded
    records, per-sample files and a per-sample transform are split over the threads."""
    from pipeline.training.handoff.assemble import Assembler

    for name, split in (("memmap", False), ("shards", False), ("encoded", True), ("pt", True)):
        ds, _, _ = _dataset(tmp_path, name)
        assert Assembler(ds, threads=3).threads == (3 if split else 1), name
        assert Assembler(ds, transform=Augment(flip=True, padding=1), threads=3).threads == 3, name
