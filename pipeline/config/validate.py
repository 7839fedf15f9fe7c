"""Checks of a composed config that composition cannot express, before any data work starts.

    from pipeline.config.validate import ConfigError, validate
    validate(cfg)  # raises ConfigError("Invalid config: loader.batch_size=0 -- must be an integer >= 1")

Where each rule lives:
- types, unknown keys and values outside an Enum fail earlier, when Hydra composes against the schemas;
- a range or a shape that one value must respect is declared on its field (pipeline/config/checks.py:
  ``at_least``, ``number``, ...) and checked by ``check_fields`` for every group, the sources' and storage
  formats' own dataclasses included;
- a source's or a storage format's rules across its own keys, or what a format needs of the source, are
  its ``validate`` (pipeline/data/sources/base.py, pipeline/data/storage/base.py);
- the ``export`` node's rules across its keys: pipeline/data/engines/ (``check_export_config``);
- what remains here crosses config groups: names of the chosen options, split and batch sizes against
  the sample count, models and transforms that need image samples, the tracking intervals, the memory
  budget against what the process already holds.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from pipeline.config.checks import TRISTATE, ConfigError, check_fields, require
from pipeline.data.engines import check_export_config
from pipeline.metrics import OBJECTIVES  # metrics logged every epoch that have a direction

__all__ = ["ConfigError", "OBJECTIVES", "check_sizes", "validate"]


def validate(cfg: DictConfig) -> None:
    """Check every user-settable value; raise ConfigError on the first bad one."""
    from pipeline.config.schema import MODEL_NAMES
    from pipeline.data.sources import sources
    from pipeline.data.storage import formats

    known_sources, known_formats = sources(), formats()
    src, sto = cfg.source, cfg.storage
    require(src.name in known_sources, "source.name", src.name, f"one of {sorted(known_sources)}")
    require(sto.name in known_formats, "storage.name", sto.name, f"one of {sorted(known_formats)}")
    require(cfg.model.name in MODEL_NAMES, "model.name", cfg.model.name, f"one of {MODEL_NAMES}")
    _check_progress(cfg)
    check_fields(cfg)
    source = known_sources[src.name]
    source.validate(cfg)
    known_formats[sto.name].validate(cfg)
    check_sizes(cfg)
    _check_images(cfg, source.shape(src))
    objective = OmegaConf.select(cfg, "objective", default="val/accuracy")
    require(objective in OBJECTIVES, "objective", objective, f"one of {OBJECTIVES}")
    require(
        not (objective.startswith("memory/epoch_peak_cuda") and cfg.trainer.device == "cpu"),
        "objective",
        objective,
        "a CUDA memory figure is logged only when training on CUDA (trainer.device=cpu here)",
    )
    _check_tracking(cfg.tracking)
    _check_memory_budget(cfg.trainer.memory_budget_mb)
    _check_data_dir(cfg, known_formats[sto.name])
    check_export_config(cfg)


def _check_data_dir(cfg: DictConfig, fmt) -> None:
    """A folder or s3://bucket/prefix; any other URL refused by name (never taken as a folder); in a bucket,
    only the formats that stream from object storage."""
    from pipeline.data.remote.errors import LocationError
    from pipeline.data.remote.urls import parse_location

    value = cfg.paths.data_dir
    try:
        loc = parse_location(value)
    except LocationError as err:
        raise ConfigError("paths.data_dir", value, str(err)) from None
    if loc.is_remote and not fmt.remote:
        raise ConfigError(
            "storage",
            fmt.name,
            f"paths.data_dir={value} is in object storage, where storage={fmt.name} cannot live: "
            f"{fmt.not_remote}. Use storage=shards or storage=encoded (they stream sequential buffers of "
            "shards through a bounded local cache)",
        )


def check_sizes(cfg: DictConfig, n: int | None = None) -> None:
    """Split and batch sizes against the sample count ``n``; by default the count a source knows from
    its config alone (digits, synthetic). Sources that learn it only by exporting (lfw, image folders)
    are checked again with the real count once exported (pipeline/stages.py)."""
    from pipeline.data.partition import size_problem
    from pipeline.data.sources import get_source

    if n is None:
        n = get_source(cfg.source.name).count(cfg.source)
    if n is None:
        return
    ratio, bs = cfg.split.ratio, cfg.loader.batch_size
    why = size_problem(n, ratio, of=f" of source={cfg.source.name}")
    require(why is None, "split.ratio", ratio, str(why))
    n_train = int(n * ratio)
    require(
        not cfg.loader.drop_last or bs <= n_train,
        "loader.batch_size",
        bs,
        f"with loader.drop_last=true it must be <= the {n_train} train samples "
        f"(split.ratio={ratio} of {n}), or no batch would ever be trained",
    )


def _check_images(cfg: DictConfig, shape) -> None:
    """Models and transforms that need image samples ([H, W] or [H, W, C]), when the source's config tells
    the shape."""
    from pipeline.data.sources.base import is_image

    if shape is None or is_image(shape):
        return
    if cfg.model.name == "cnn":
        raise ConfigError(
            "source.shape",
            list(shape),
            "model=cnn needs images: [H, W] or [H, W, C] (use model=mlp for other shapes)",
        )
    t = OmegaConf.select(cfg, "transform")
    if t is not None and (t.flip or t.crop_padding or t.resized_crop or t.size is not None):
        raise ConfigError(
            "transform.name",
            str(t.name),
            f"flip, crop and resize need images, [H, W] or [H, W, C]; source.shape={list(shape)} is not one "
            "(use transform=none or transform=normalize)",
        )


def _check_progress(cfg: DictConfig) -> None:
    """``progress=auto|true|false`` (a scalar: the bars switch alone); the node's keys are field checks."""
    node = cfg.progress
    if not OmegaConf.is_config(node):
        require(str(node).lower() in TRISTATE, "progress", node, f"one of {TRISTATE} (or set progress.bars)")


def _check_tracking(tracking: DictConfig) -> None:
    beat, stale = tracking.heartbeat_s, tracking.stale_after_s
    require(
        stale >= 2 * beat,
        "tracking.stale_after_s",
        stale,
        f"seconds >= 2 x tracking.heartbeat_s ({2 * beat:g}), e.g. 300: a run whose heartbeat is older "
        "is taken for dead",
    )


def _check_memory_budget(budget) -> None:
    """A budget below what this process already holds could never be met."""
    if budget is None:
        return
    from pipeline.system.memory import snapshot

    base = snapshot().used_mb
    require(
        budget > base,
        "trainer.memory_budget_mb",
        budget,
        f"too small to start: this process already uses {base:.0f} MB (memory/used_mb), which it already "
        f"holds before loading any data (Python, torch and the pipeline's libraries); give at least "
        f"{base + 100:.0f}, or null for no budget",
    )
