"""pipeline.api: compose a config from Python, run the stages one by one, or the whole tracked job."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline import api
from pipeline.config.validate import ConfigError
from tests.conftest import copy_store, run_cli, sqlite_uri


def test_compose_config_sets_a_concrete_output_dir(tmp_path):
    cfg = api.compose_config(["trainer.epochs=1", "model=cnn"])
    out = cfg.paths.output_dir
    assert out.startswith(f"{tmp_path}/outputs/notebook/")  # PIPELINE_ROOT is tmp_path in tests
    assert cfg.trainer.epochs == 1 and cfg.model.name == "cnn"
    saved = OmegaConf.load(f"{out}/.hydra/config.yaml")
    assert saved.model.name == "cnn" and saved.paths.output_dir == out
    assert api.compose_config(output_dir=tmp_path / "mine").paths.output_dir == str(tmp_path / "mine")


def test_compose_config_rejects_bad_values_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"loader\.batch_size=0"):
        api.compose_config(["loader.batch_size=0"])
    assert not (tmp_path / "outputs" / "data").exists()


@pytest.mark.fresh_store
def test_stages_one_by_one_match_the_cli(tmp_path, mlflow_template):
    """The notebook stages are the job's own functions (pipeline/stages.py): the same config gives the same
    numbers, bit for bit, stage by stage in this process and through the real ``pipeline`` command -- with
    augmentation, normalisation and dropout, so every seed and the thread setting matter."""
    overrides = [
        "trainer.epochs=2",
        "transform=flip_crop",
        "transform.crop_padding=1",
        "model.dropout=0.2",
        "storage.shard_size_mb=0.05",
        "tracking.log_model=false",
    ]
    cfg = api.compose_config(overrides)
    exp = api.export_data(cfg)
    assert exp.spec.num_samples == 1797 and not exp.reused
    split = api.split_data(cfg, exp)
    assert len(split.train) == 1437 and len(split.val) == 360
    train_loader, val_loader = api.make_loaders(cfg, exp, split)
    model = api.make_model(cfg, exp, train_loader)
    history = api.train(cfg, model, train_loader, val_loader)
    assert len(history) == 2 and history[-1]["val/accuracy"] > 0.3
    paths = api.plot(cfg, exp, model, val_loader, history)
    assert [p.name for p in paths] == ["samples.png", "loss.png", "accuracy.png", "confusion_matrix.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # the stages track nothing

    copy_store(mlflow_template, tmp_path)  # (a ready store: creating one is test_job's business)
    proc = run_cli(tmp_path, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(sqlite_uri(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["data.reused"] == "true"
    for key in ("train/loss", "val/loss", "val/accuracy"):
        cli = [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        assert cli == [h[key] for h in history], key  # exact float equality, every epoch
