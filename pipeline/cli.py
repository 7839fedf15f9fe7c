"""The ``pipeline`` command: Hydra composes conf/config.yaml plus your overrides, then runs one job.

    pipeline                                   # digits, pt storage, mlp, 5 epochs
    pipeline source=synthetic storage=npy trainer.epochs=2
    pipeline -m loader.batch_size=32,64 loader.num_workers=0,2     # a sweep: 4 child runs

Returns the final epoch's ``objective`` metric (default val/accuracy; conf/hparams_search/ presets set
perf/train_samples_per_s) -- what Hydra sweepers such as optuna optimise.
"""

from __future__ import annotations

import signal

import hydra
from omegaconf import DictConfig

import pipeline.config
from pipeline.config import resolvers

pipeline.config.register()  # the schemas and resolvers, before Hydra composes
CONF_DIR = str(resolvers.CONF_DIR)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C, so the MLflow run ends KILLED


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    from pipeline.config.validate import validate

    validate(cfg)  # a config error fails here, before torch and MLflow are imported
    from pipeline.job import run

    signal.signal(signal.SIGTERM, _terminate)
    return float(run(cfg)[cfg.get("objective", "val/accuracy")])
