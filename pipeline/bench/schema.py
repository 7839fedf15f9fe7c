"""The loader bench's config: its schema (``base_bench``, which conf/bench.yaml extends), its checks, and
the options of the other formats it measures.

    from pipeline.bench import schema
    schema.register()                          # base_bench in Hydra's ConfigStore (the CLI does it)
    schema.validate(cfg)                       # ConfigError naming the bad key, before any work
    scfg = schema.storage_options("shards", cfg.storage)

The bench composes the product's groups (source, storage, split, loader, tracking, paths, progress) on
the product's schemas (pipeline/config/schema.py) and adds ``bench``: the grid and how long each point
is measured. A new grid dimension is a field of ``BenchOptions``, its check in ``validate`` and a loop
in pipeline/bench/loader.py.

``storage`` (conf/bench.yaml's defaults) sets the options of its own format, overrides included
(``storage=shards storage.shard_size_mb=8``). Every other format in ``bench.storages`` gets its own
option as Hydra composes it: ``compose(overrides=["+storage=<name>"])``, i.e. conf/storage/<name>.yaml
on its ``base_*`` schema, through Hydra's search path (``--config-dir`` included).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline.config.resolvers import CONF_DIR
from pipeline.config.schema import (
    Choice,
    LoaderConfig,
    MLPConfig,
    PathsConfig,
    ProgressConfig,
    SourceConfig,
    SplitConfig,
    StorageConfig,
    TrackingConfig,
    TrainerConfig,
)


class CacheState(Choice):
    warm = "warm"  # a warm-up pass first; the data stays in the page cache
    cold = "cold"  # the export's pages dropped before every pass


@dataclass
class BenchOptions:
    """``python -m pipeline.bench``: the grid it measures and how long it measures each point."""

    storages: List[str] = field(default_factory=lambda: ["pt", "memmap", "shards"])
    num_workers: List[int] = field(default_factory=lambda: [0])
    batch_sizes: List[int] = field(default_factory=lambda: [64])
    thread_prefetch: List[int] = field(default_factory=lambda: [0])
    decode_threads: List[int] = field(default_factory=lambda: [0])  # loader.decode_threads per point
    min_passes: int = 2  # timed passes over the train split (after one warm-up pass), at least
    min_seconds: float = 1.0  # ... and at least this long in total
    max_passes: int = 100
    seed: int = 0
    cache: CacheState = CacheState.warm  # cold: the export's pages dropped before every measured pass
    memory_limit_mb: Optional[float] = (
        None  # each pass in a memory-capped cgroup (where possible); null: none
    )


@dataclass
class BenchConfig:
    source: SourceConfig = MISSING
    storage: StorageConfig = MISSING
    split: SplitConfig = field(default_factory=SplitConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    bench: BenchOptions = field(default_factory=BenchOptions)
    progress: Any = field(default_factory=ProgressConfig)  # exports: bars or log lines


def register() -> None:
    """``base_bench`` for conf/bench.yaml, beside the product's base_* schemas its groups use."""
    import pipeline.config

    pipeline.config.register()  # the product's schemas and resolvers

    ConfigStore.instance().store(name="base_bench", node=BenchConfig)


def validate(cfg: DictConfig) -> None:
    """The product's checks on source/storage/split/loader (model and trainer at their defaults), then the
    bench grid's. Raises pipeline.config.validate.ConfigError naming the key, the value and what is valid."""
    from pipeline.config.checks import is_int as _is_int
    from pipeline.config.checks import require as _check
    from pipeline.config.validate import validate as validate_product
    from pipeline.data.storage import formats

    FORMATS = formats()

    full = OmegaConf.create({k: cfg[k] for k in cfg if k not in ("bench", "hydra")})
    full.model = OmegaConf.structured(MLPConfig())  # training-only groups at their defaults
    full.trainer = OmegaConf.structured(TrainerConfig())
    validate_product(full)
    b = cfg.bench
    for name in b.storages:
        _check(name in FORMATS, "bench.storages", list(b.storages), f"names from {sorted(FORMATS)}")
    for key, minimum in (
        ("num_workers", 0),
        ("batch_sizes", 1),
        ("thread_prefetch", 0),
        ("decode_threads", 0),
    ):
        vals = list(b[key])
        _check(
            len(vals) >= 1 and all(_is_int(v) and v >= minimum for v in vals),
            f"bench.{key}",
            vals,
            f"a non-empty list of integers >= {minimum}",
        )
    _check(_is_int(b.min_passes) and b.min_passes >= 1, "bench.min_passes", b.min_passes, "an integer >= 1")
    _check(b.max_passes >= b.min_passes, "bench.max_passes", b.max_passes, ">= bench.min_passes")
    _check(b.min_seconds >= 0, "bench.min_seconds", b.min_seconds, ">= 0")
    limit = b.memory_limit_mb
    _check(
        limit is None or (isinstance(limit, (int, float)) and limit > 0),
        "bench.memory_limit_mb",
        limit,
        "a number of MB > 0, or null for no cap",
    )


def storage_options(name: str, current: DictConfig) -> DictConfig:
    """``current`` for its own format; for another, its option as Hydra composes ``storage=<name>``. Inside
    ``python -m pipeline.bench`` Hydra is initialized with the bench's search path; elsewhere (a notebook,
    a test) with conf/."""
    if name == current.name:
        return current
    context = nullcontext() if GlobalHydra.instance().is_initialized() else _conf_dir()
    with context:
        return compose(overrides=[f"+storage={name}"]).storage


def _conf_dir():
    register()
    return initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3")
