"""``loader.num_workers=auto`` / ``decode_threads=auto``: from the last tune for this machine, data and job
shape (pipeline/tune/record.py), else from the documented rule (pipeline/tune/auto.py); logged."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline import stages
from pipeline.config.validate import ConfigError, validate
from pipeline.tune import auto, facts, record
from tests.conftest import compose_cfg
from tests.image_folders import make_image_folder
from tests.run_helpers import client, run_job

CPU = torch.device("cpu")


def _loaders(cfg):
    exp = stages.export_data(cfg)
    split = stages.split_data(cfg, exp)
    train, val = stages.make_loaders(cfg, exp, split, CPU)
    train.close(), val.close()
    return exp, train


def _threads(loader) -> int:
    return loader.assembler.threads


def test_auto_is_accepted_and_a_bad_value_is_refused_naming_what_is_valid(tmp_path):
    validate(compose_cfg(tmp_path, ["loader.num_workers=auto", "loader.decode_threads=auto"]))
    for key in ("loader.num_workers", "loader.decode_threads"):
        with pytest.raises(ConfigError, match=rf"{key}='many' -- auto or an integer >= 0"):
            validate(compose_cfg(tmp_path, [f"{key}=many"]))


def test_auto_without_a_tune_follows_the_rule_and_the_job_logs_it(tmp_path):
    """digits: fixed-size samples, no augmentation: nothing for workers or threads to share."""
    run_id = run_job(tmp_path, ["loader.num_workers=auto", "loader.decode_threads=auto", "trainer.epochs=1"])
    params = client(tmp_path).get_run(run_id).data.params
    assert params["loader.num_workers"] == "auto"  # what was asked ...
    assert params["loader.resolved.num_workers"] == "0"  # ... and what it became
    assert params["loader.resolved.decode_threads"] == "0"
    assert params["loader.resolved.from"].startswith("rule: no per-sample work")


def test_the_rule_spreads_per_sample_decoding_and_augmentation_over_the_cores(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=8, broken=False)
    common = ["source=image_folder", f"source.root={root}", "source.size=[24,24]", "storage=encoded"]
    common += ["transform=flip_crop", "loader.batch_size=8", "split.stratify=false"]
    cores = facts.machine().job_cores
    _, train = _loaders(
        compose_cfg(tmp_path, [*common, "loader.num_workers=auto", "loader.decode_threads=auto"])
    )
    workers = auto.rule_workers(cores) if cores >= 2 else 0
    assert train.num_workers == workers and train.resolved["loader.resolved.num_workers"] == workers
    assert _threads(train) == 1  # decode_threads 0 (one thread) beside workers
    assert train.resolved["loader.resolved.from"].startswith("rule: per-sample decoding and augmentation")
    # workers set to 0 by the user: the threads take the per-sample work instead
    _, train = _loaders(
        compose_cfg(tmp_path, [*common, "loader.num_workers=0", "loader.decode_threads=auto"])
    )
    assert train.num_workers == 0 and _threads(train) == max(1, cores if cores >= 2 else 0)
    assert "loader.resolved.num_workers" not in train.resolved  # a value that is not auto is never changed


def test_auto_uses_the_last_tune_for_this_machine_data_and_job_shape(tmp_path):
    common = ["loader.num_workers=auto", "loader.decode_threads=auto", "loader.batch_size=128"]
    cfg = compose_cfg(tmp_path, common)
    exp = stages.export_data(cfg)
    machine = facts.machine(facts.device_name(CPU))
    path = record.write(
        cfg.paths.outputs,
        machine,
        exp.fingerprint,
        record.shape_of(cfg),
        {
            "storage": "shards",
            "loader.num_workers": 1,
            "loader.decode_threads": 2,
            "loader.thread_prefetch": 0,
        },
        run_id="abc123",
    )
    assert path.parent == tmp_path / "outputs" / "tune" / "records"
    _, train = _loaders(cfg)
    # resolved from the record (the digits shards have no per-sample work: the assembler then reads each
    # batch in one piece, whatever decode_threads says)
    assert train.num_workers == 1 and train.resolved["loader.resolved.decode_threads"] == 2
    assert train.resolved["loader.resolved.from"].startswith("tune abc123")
    # another batch size is another job shape: the tune does not hold for it
    _, train = _loaders(compose_cfg(tmp_path, [*common, "loader.batch_size=64"]))
    assert train.num_workers == 0 and train.resolved["loader.resolved.from"].startswith("rule")
    # only the keys that say auto are taken from the tune
    _, train = _loaders(compose_cfg(tmp_path, [*common, "loader.num_workers=0"]))
    assert train.num_workers == 0 and train.resolved["loader.resolved.decode_threads"] == 2


def test_a_damaged_record_is_ignored_and_the_rule_decides(tmp_path, caplog):
    cfg = compose_cfg(tmp_path, ["loader.num_workers=auto"])
    exp = stages.export_data(cfg)
    machine = facts.machine(facts.device_name(CPU))
    path = record.path_for(cfg.paths.outputs, machine.fingerprint(), exp.fingerprint, record.shape_of(cfg))
    path.parent.mkdir(parents=True)
    path.write_text('{"version": 1, "settings": {"loader.num_')  # cut short
    with caplog.at_level(logging.WARNING):
        _, train = _loaders(cfg)
    assert train.num_workers == 0 and train.resolved["loader.resolved.from"].startswith("rule")
    assert "cannot be read" in caplog.text and str(path) in caplog.text


def test_the_machine_fingerprint_names_the_kind_of_machine_not_the_host():
    m = facts.machine()
    assert m.fingerprint() == facts.machine().fingerprint()
    import dataclasses

    assert dataclasses.replace(m, cores=m.cores + 1).fingerprint() != m.fingerprint()
    assert dataclasses.replace(m, memory_room_mb=m.memory_room_mb * 2 + 2048).fingerprint() != m.fingerprint()
    assert dataclasses.replace(m, ram_mb=1.0).fingerprint() == m.fingerprint()  # room, not RAM, matters
