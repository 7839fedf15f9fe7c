"""The ``pipeline-export`` command: the export stage alone, with the config and overrides of ``pipeline``.

    pipeline-export source=image_folder source.root=/data/pets 'source.size=[160,160]' source.mode=RGB \\
        storage=encoded storage.codec=jpeg storage.quality=90          # all cores (export.workers=auto)
    pipeline-export -m storage=shards,encoded                           # a multirun: one export per format
    pipeline-export export.engine=dask export.address=tcp://head:8786   # on a Dask cluster

The same overrides give the same export (the fingerprint hashes the source and storage configs only), so a
later ``pipeline`` run with them reuses it. Prints the export's folder, its content digest and, when it was
built now, how fast; exits non-zero with the error when the config is invalid or the export fails. Nothing
is tracked in MLflow (the export's manifest records its figures; a ``pipeline`` job logs them when it builds
the export itself). The config is checked before anything heavy is imported (no torch, no MLflow).
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
    raise SystemExit(128 + signum)  # unwinds: the export's workers stop, its temp folder is removed


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    from pipeline.config.validate import validate

    validate(cfg)  # a config error fails here, before any data work
    from pipeline import progress, stages

    signal.signal(signal.SIGTERM, _terminate)
    progress.configure(cfg.progress)
    exp = stages.export_data(cfg)
    speed = exp.throughput
    how = "reused" if exp.reused else "built"
    if not exp.reused and speed:
        how += (
            f" in {exp.manifest['export_seconds']:.1f} s: {speed['samples_per_s']:.0f} samples/s, "
            f"{speed['mb_per_s']:.1f} MB/s, {speed['workers']} workers ({speed['engine']})"
        )
    where = exp.url or exp.root  # s3://... for an export in a bucket
    print(f"export: {where}\ncontent_sha256: {exp.manifest['content_sha256']}\n{how}", flush=True)


if __name__ == "__main__":
    main()
