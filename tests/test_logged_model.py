"""The final model logged to MLflow loads back and reproduces the logged val accuracy."""

from __future__ import annotations

import torch

from pipeline.data.export import export
from pipeline.data.partition import load_split
from pipeline.tracking.logged_model import load_logged_model
from pipeline.training.loading import build_loader
from pipeline.training.train import evaluate
from tests.conftest import compose_cfg, sqlite_uri
from tests.run_helpers import FAST, client, run_job


def test_logged_model_reproduces_the_logged_val_metrics(tmp_path, monkeypatch):
    run_id = run_job(tmp_path, ["trainer.epochs=2", "tracking.log_model=true"])
    logged = client(tmp_path).get_run(run_id).data.metrics
    cfg = compose_cfg(tmp_path, FAST)
    exp = export(cfg.source, cfg.storage, cfg.paths.data_dir)  # reused, not rebuilt
    split = load_split(tmp_path / "run" / "split.npz")
    cpu = torch.device("cpu")
    val = build_loader(exp.dataset(split.val, cfg.storage), cfg.loader, seed=0, train=False, device=cpu)

    model = load_logged_model(sqlite_uri(tmp_path), run_id)  # weights_only, no pickle
    assert evaluate(model, val, cpu) == (logged["val/loss"], logged["val/accuracy"])

    # the same artifact is a regular MLflow pytorch model (pickle format: MLflow wants an opt-in)
    import mlflow
    import mlflow.pytorch

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    mlflow.set_tracking_uri(sqlite_uri(tmp_path))
    native = mlflow.pytorch.load_model(f"runs:/{run_id}/model", map_location="cpu")
    assert evaluate(native, val, cpu)[1] == logged["val/accuracy"]
