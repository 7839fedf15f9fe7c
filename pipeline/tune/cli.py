"""The ``pipeline-tune`` command: the job's config and overrides (conf/tune.yaml), measured and answered.

    pipeline-tune source=image_folder source.root=/data/photos storage=encoded transform=flip_crop
    pipeline-tune tune.budget_s=60 'tune.storages=[shards,memmap]'
    ...
    pipeline source=image_folder source.root=/data/photos storage=encoded transform=flip_crop \
        loader.decode_threads=2

The config is checked before torch or MLflow is imported (a bad value fails at once, naming it); then
pipeline/tune/tuner.py measures and tries, and pipeline/tune/report.py answers: the report, the config file
(``tune.output``), the record ``loader.num_workers=auto`` reads, the MLflow runs, and, as the last line
printed, the ``pipeline`` command with the tuned overrides.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.config.checks import ConfigError
from pipeline.config.resolvers import CONF_DIR
from pipeline.tune import schema

log = logging.getLogger(__name__)

schema.register()  # base_tune and the job's schemas, before Hydra composes conf/tune.yaml


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def run(cfg: DictConfig, user_overrides: list[str] | None = None):
    """Tune, then answer (files, record, MLflow); returns (answer, parent run id)."""
    schema.validate(cfg)  # before torch and MLflow
    from pipeline import progress
    from pipeline.tune import record, report
    from pipeline.tune.tuner import tune

    progress.configure(cfg.progress)
    answer = tune(cfg, user_overrides)
    config_path = report.write_config(answer, cfg.tune.output)
    run_id = report.publish(cfg, answer, Path(cfg.paths.output_dir), config_path)
    settings = answer.chosen.settings()
    record.write(
        cfg.paths.outputs,
        answer.facts.machine,
        answer.exports[answer.chosen.storage],
        record.shape_of(cfg),
        settings,
        run_id=run_id,
        gain=answer.gain,
        beat_default=answer.beat_default,
    )
    log.info("tune: report\n%s", report.markdown(answer))
    log.info("tune: config written to %s (`pipeline local=%s` when it is in conf/local/)", config_path,
             Path(config_path).stem)  # fmt: skip
    return answer, run_id


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="tune")
def _main(cfg: DictConfig) -> None:
    signal.signal(signal.SIGTERM, _terminate)
    answer, _ = run(cfg)
    for handler in logging.getLogger().handlers:
        handler.flush()
    print(answer.command, flush=True)  # the last line: the job to run


def main() -> None:
    try:
        _main()
    except ConfigError as err:  # Hydra prints the traceback; this keeps the message on top
        raise SystemExit(str(err)) from err


if __name__ == "__main__":
    sys.exit(main())
