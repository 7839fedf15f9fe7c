"""The tuner's config: the job's own config (conf/config.yaml, every group and override) plus a ``tune`` node.

    pipeline-tune storage=encoded transform=flip_crop tune.budget_s=60 'tune.storages=[encoded,shards]'

conf/tune.yaml composes the job's conf/config.yaml, then ``base_tune`` (``TuneConfig``: the job's ``Config``
with ``tune`` added), so a tune and the job it tunes compose the same source, storage, model, batch size
and local overrides; only ``tune.*`` and where Hydra writes the run differ. ``validate`` runs the job's
checks, then the tune node's, before any import of torch or MLflow.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline.config.checks import constrained, number, text
from pipeline.config.schema import Config


def _names(v) -> bool:
    items = list(v) if OmegaConf.is_list(v) or isinstance(v, (list, tuple)) else None
    return items is not None and len(items) >= 1 and all(isinstance(i, str) and i for i in items)


@dataclass
class TuneOptions:
    """``pipeline-tune``: how long it may measure, what it may export, where its answer goes."""

    # seconds for measuring the machine and the data and for the trials (an export the job needs anyway is
    # done first and not counted)
    budget_s: float = number(120.0, at_least=10.0, valid="seconds >= 10, e.g. 120")
    # storage formats the tuner may export and try; null: the configured one only
    storages: Optional[List[str]] = constrained(
        None, _names, "null (the configured storage only) or a non-empty list of format names", optional=True
    )
    # the answer as a config file: `pipeline local=tuned` when it is conf/local/tuned.yaml
    output: str = text("${paths.root}/conf/local/tuned.yaml", valid="a file path, e.g. conf/local/tuned.yaml")
    # a setting is recommended over the default only when it is this much faster in the same run
    min_gain: float = number(0.05, at_least=0.0, below=10.0, valid="a fraction >= 0, e.g. 0.05 (5%)")


def _tune_config() -> type:
    """``Config`` plus ``tune``, every inherited field MISSING: conf/tune.yaml merges it after the job's
    config.yaml, and a MISSING value never replaces one already composed (a structured node merged last
    would otherwise reset every key to its schema default, conf/local/ included)."""
    hints = typing.get_type_hints(Config)
    inherited = [(f.name, hints[f.name], field(default=MISSING)) for f in dataclasses.fields(Config)]
    tune = ("tune", TuneOptions, field(default_factory=TuneOptions))
    kind = dataclasses.make_dataclass("TuneConfig", [*inherited, tune], bases=(Config,))
    kind.__module__ = __name__
    return kind


TuneConfig = _tune_config()


def register() -> None:
    """``base_tune`` (conf/tune.yaml's first default), beside the job's schemas."""
    import pipeline.config

    pipeline.config.register()
    ConfigStore.instance().store(name="base_tune", node=TuneConfig)


def validate(cfg: DictConfig) -> None:
    """The job's checks (the config it would run), then ``tune.storages`` against the known formats.
    Raises pipeline.config.checks.ConfigError naming the key, the value and what is valid."""
    from pipeline.config.checks import require
    from pipeline.config.validate import validate as validate_job
    from pipeline.data.storage import formats

    validate_job(cfg)
    known = formats()
    storages = cfg.tune.storages
    if storages is not None:
        bad = [s for s in storages if s not in known]
        require(not bad, "tune.storages", list(storages), f"names from {sorted(known)} (unknown: {bad})")


def allowed_storages(cfg: DictConfig) -> list[str]:
    """The formats the tuner may export and try: ``tune.storages``, the configured one first."""
    configured = str(cfg.storage.name)
    listed = list(cfg.tune.storages) if cfg.tune.storages is not None else []
    return list(dict.fromkeys([configured, *listed]))
