"""pipeline.api: compose a config from Python, run the stages one by one, or the whole tracked job."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline import api
from pipeline.config.validate import ConfigError
from tests.conftest import copy_store, sqlite_uri


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
def test_stages_one_by_one_match_the_tracked_job(tmp_path, mlflow_template):
    cfg = api.compose_config(["trainer.epochs=1", "storage=npy"])
    exp = api.export_data(cfg)
    assert exp.spec.num_samples == 1797 and not exp.reused
    split = api.split_data(cfg, exp)
    assert len(split.train) == 1437 and len(split.val) == 360
    train_loader, val_loader = api.make_loaders(cfg, exp, split)
    model = api.make_model(cfg, exp)
    history = api.train(cfg, model, train_loader, val_loader)
    assert len(history) == 1 and history[-1]["val/accuracy"] > 0.5
    paths = api.plot(cfg, exp, model, val_loader, history)
    assert [p.name for p in paths] == ["samples.png", "loss.png", "accuracy.png", "confusion_matrix.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # the stages track nothing

    copy_store(mlflow_template, tmp_path)  # (a ready store: creating one is test_job's business)
    final = api.run(cfg)  # the whole job: same seeds, same data, same numbers, now tracked
    assert final["val/accuracy"] == history[-1]["val/accuracy"]
    client = MlflowClient(sqlite_uri(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["data.reused"] == "true"
    assert {"hydra", "plots"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
