"""The final model as an MLflow artifact, and loading it back.

    from pipeline.tracking.logged_model import log_final_model, load_logged_model
    log_final_model(tracked_run, model, cfg.model, export.spec)     # -> runs:/<run id>/model
    model = load_logged_model(tracking_uri, run_id)                 # nn.Module, eval mode, CPU

The run's ``model`` artifact folder is an MLflow pytorch model saved with
``serialization_format="pickle"`` and explicit pip requirements (far faster than MLflow's default
``pt2`` export, which also needs an input example: docs/reproducibility.md), so MLflow tools can use it:
``mlflow.pytorch.load_model("runs:/<id>/model")`` -- which, since the pickle can run code, MLflow
only does with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true``, and which needs this project importable
(the pickle refers to ``pipeline.training.models``).

Beside it the folder holds ``state_dict.pt`` and ``pipeline_model.json`` (model config, sample
spec and the input normalisation's mean/std): ``load_logged_model`` rebuilds the model with
``build_model`` and loads the weights with ``torch.load(weights_only=True)`` -- no pickle.
``import mlflow.pytorch`` is slow (docs/reproducibility.md), so it is imported here, lazily, only when a
model is logged.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipeline.data.sources import SampleSpec
from pipeline.training.models import build_model, input_stats

ARTIFACT = "model"
STATE = "state_dict.pt"
DESCRIPTION = "pipeline_model.json"


def pip_requirements() -> list[str]:
    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    for dist in ("numpy", "mlflow"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return reqs


def log_final_model(tr, model: torch.nn.Module, model_cfg, spec: SampleSpec) -> str:
    """Log ``model`` (moved to CPU) as the run's ``model`` artifact; return its URI."""
    import mlflow.pytorch

    model = model.to("cpu").eval()
    quiet = logging.getLogger("mlflow.pytorch")  # its pickle warning: see this module's docstring
    level = quiet.level
    with tempfile.TemporaryDirectory(prefix="pipeline-model-") as tmp:
        path = Path(tmp) / ARTIFACT
        quiet.setLevel(logging.ERROR)
        try:
            mlflow.pytorch.save_model(
                model, str(path), serialization_format="pickle", pip_requirements=pip_requirements()
            )
        finally:
            quiet.setLevel(level)
        torch.save(model.state_dict(), path / STATE)
        description = {
            "model": OmegaConf.to_container(model_cfg, resolve=True),
            "spec": asdict(spec),
            "input_stats": input_stats(model),  # (mean, std) of transform.normalize, or null
        }
        (path / DESCRIPTION).write_text(json.dumps(description, indent=1))
        tr.log_artifact(path, ARTIFACT)
    return f"runs:/{tr.run_id}/{ARTIFACT}"


def load_logged_model(tracking_uri: str, run_id: str) -> torch.nn.Module:
    """The run's final model, rebuilt from its description, weights read with weights_only=True."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="pipeline-model-") as tmp:
        folder = Path(client.download_artifacts(run_id, ARTIFACT, tmp))
        description = json.loads((folder / DESCRIPTION).read_text())
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    spec = description["spec"]
    spec = SampleSpec(**{**spec, "shape": tuple(spec["shape"]), "class_names": tuple(spec["class_names"])})
    model = build_model(OmegaConf.create(description["model"]), spec, description.get("input_stats"))
    model.load_state_dict(state)
    return model.eval()
