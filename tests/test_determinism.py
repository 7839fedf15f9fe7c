"""Determinism: the same config gives the same order and bitwise-identical metrics on CPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from pipeline.config.schema import LoaderConfig
from pipeline.data.sampling import EpochShuffle
from pipeline.training.loading import build_loader
from pipeline.training.seeding import capture_rng, restore_rng
from tests.run_helpers import client, histories, run_job


class Ids(Dataset):
    """Item i is (tensor(i), 0): the loader's order, readable from the batches."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor(i), 0


def _loader_cfg(**kw):
    return OmegaConf.structured(LoaderConfig(**{"batch_size": 8, "pin_memory": "false", **kw}))


def _orders(loader, epochs: int) -> list[list[int]]:
    return [torch.cat([x for x, _ in loader]).tolist() for _ in range(epochs)]


def test_order_is_the_same_for_any_worker_setting():
    ds = Ids(100)
    cpu = torch.device("cpu")
    ref = _orders(build_loader(ds, _loader_cfg(), seed=7, train=True, device=cpu), 3)
    assert sorted(ref[0]) == list(range(100)) and ref[0] != ref[1] != ref[2]
    for kw in (dict(num_workers=2), dict(num_workers=2, persistent_workers=True)):
        assert _orders(build_loader(ds, _loader_cfg(**kw), seed=7, train=True, device=cpu), 3) == ref, kw
    other = _orders(build_loader(ds, _loader_cfg(), seed=8, train=True, device=cpu), 1)
    assert other[0] != ref[0]


def test_set_epoch_replays_an_epoch_order():
    loader = build_loader(Ids(50), _loader_cfg(), seed=1, train=True, device=torch.device("cpu"))
    first = _orders(loader, 3)
    loader.set_epoch(2)
    assert _orders(loader, 1)[0] == first[2]
    sampler = EpochShuffle(50, 1)
    sampler.set_epoch(1)
    assert list(sampler) == first[1]


def test_rng_state_survives_a_weights_only_round_trip():
    import random

    g = torch.Generator().manual_seed(3)
    state = capture_rng({"train": g})
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    expected = (
        torch.rand(4).tolist(),
        np.random.rand(3).tolist(),
        random.random(),
        torch.rand(2, generator=g),
    )
    torch.manual_seed(99), np.random.seed(99), random.seed(99), g.manual_seed(99)
    restore_rng(loaded, {"train": g})
    got = (torch.rand(4).tolist(), np.random.rand(3).tolist(), random.random(), torch.rand(2, generator=g))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_same_config_gives_bitwise_identical_metrics_for_any_workers_and_decode_threads(tmp_path):
    """A run with 2 workers and 2 decode threads gives the metrics of 0 workers, bitwise, every epoch (so the
    parallelism does not change them, nor does running again); another seed does not."""
    runs = {
        name: run_job(tmp_path, ["trainer.epochs=2", *overrides], name)
        for name, overrides in [
            ("w0", ["loader.num_workers=0"]),
            ("w2", ["loader.num_workers=2", "loader.decode_threads=2"]),
            ("seed1", ["trainer.seed=1"]),
        ]
    }
    h = {name: histories(tmp_path, run_id) for name, run_id in runs.items()}
    assert all(len(v) == 2 for v in h["w0"].values())
    assert h["w0"] == h["w2"]  # exact float equality, every metric, every epoch
    assert h["seed1"]["train/loss"] != h["w0"]["train/loss"]

    tags = {name: client(tmp_path).get_run(run_id).data.tags for name, run_id in runs.items()}
    for tag in ("data.content_sha256", "data.fingerprint", "split.digest"):
        assert tags["w0"][tag] == tags["w2"][tag], tag
    assert tags["w0"]["config.sha256"] != tags["w2"]["config.sha256"]  # the loader settings are config
    assert tags["w0"]["config.sha256"] != tags["seed1"]["config.sha256"]
    assert tags["w0"]["split.digest"] == tags["seed1"]["split.digest"]  # split.seed unchanged
    for tag in (
        "git.commit",
        "version.python",
        "version.torch",
        "version.numpy",
        "version.hydra",
        "version.mlflow",
    ):
        assert tags["w0"][tag] not in ("", "not installed"), tag
    assert tags["w0"]["pipeline.output_dir"] == str(tmp_path / "w0")


def test_flip_crop_metrics_are_bitwise_identical_for_0_and_2_workers_and_uint8_storage(tmp_path):
    """transform=flip_crop (per-sample augmentation + normalisation): the same metrics, bit for bit, with 0
    workers and with 2 workers, thread prefetch and uint8 storage (one run for all: any difference would
    show); the train figures are logged; without the transform training differs."""
    common = ["trainer.epochs=2", "transform=flip_crop", "transform.crop_padding=2"]
    runs = {
        name: run_job(tmp_path, [*common, *overrides], name)
        for name, overrides in [
            ("w0", ["loader.num_workers=0"]),
            ("w2_uint8", ["loader.num_workers=2", "loader.thread_prefetch=2", "storage.dtype=uint8"]),
        ]
    }
    h = {name: histories(tmp_path, run_id) for name, run_id in runs.items()}
    assert all(len(v) == 2 for v in h["w0"].values())
    assert h["w0"] == h["w2_uint8"]
    params = {name: client(tmp_path).get_run(run_id).data.params for name, run_id in runs.items()}
    assert params["w0"]["transform.train_mean"] == params["w2_uint8"]["transform.train_mean"]
    assert 0 < float(params["w0"]["transform.train_std"]) < 1
    plain = run_job(tmp_path, ["trainer.epochs=2"], "no_transform")
    assert histories(tmp_path, plain) != h["w0"]  # the transform does change training
    assert "transform.train_mean" not in client(tmp_path).get_run(plain).data.params


@pytest.mark.slow  # ~20 s: three jobs
@pytest.mark.parametrize("buffers", ["memory", "mapped"])
def test_shards_give_bitwise_identical_metrics_for_0_or_2_workers_and_thread_prefetch(tmp_path, buffers):
    """shards' batch sampler reads the buffers and hands each batch its records (memory) or positions
    (mapped): the batches, so the metrics, do not depend on where ``__getitems__`` runs."""
    shards = ["storage=shards", "storage.shard_size_mb=0.05", "storage.shuffle_buffer_shards=2"]
    shards.append(f"storage.buffers={buffers}")
    runs = {
        name: run_job(tmp_path, ["trainer.epochs=2", *shards, *overrides], name)
        for name, overrides in [
            ("w0", ["loader.num_workers=0"]),
            ("w2", ["loader.num_workers=2"]),
            ("prefetch", ["loader.thread_prefetch=3"]),
        ]
    }
    h = {name: histories(tmp_path, run_id) for name, run_id in runs.items()}
    assert all(len(v) == 2 for v in h["w0"].values())
    assert h["w0"] == h["w2"] == h["prefetch"]
