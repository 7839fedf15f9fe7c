"""Config schemas: every default is written here or in the module of the option it configures, once; conf/
YAML options hold only what differs.

    pipeline.config.register()   # registers these dataclasses in Hydra's ConfigStore as base_*

The groups' options extend a base: ``SourceConfig`` (each source module's own dataclass, e.g.
``pipeline.data.sources.synthetic.SyntheticConfig``), ``StorageConfig`` (each storage format's, e.g.
``pipeline.data.storage.shards.ShardsConfig``), ``ModelConfig`` (below). A wrong type or an unknown key fails
when Hydra composes; a value outside a range fails in ``pipeline.config.checks.check_fields``, which reads
the constraint declared on the field (``at_least``, ``number``, ...). Checks across keys:
pipeline/config/validate.py and the sources' and formats' ``validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from pipeline.config.checks import (
    TRISTATE,
    at_least,
    auto_or_at_least,
    constrained,
    int_list,
    is_number,
    number,
    one_of,
    text,
)


class Choice(str, Enum):
    """A closed set of string options: a wrong value fails when Hydra composes, naming the valid ones.
    Members compare equal to their strings and print as them (``str(Optimizer.adam) == "adam"``)."""

    def __str__(self) -> str:
        return self.value


class StoredDtype(Choice):
    source = "source"  # store what the source yields (float32 for lfw and digits, uint8 for image folders)
    uint8 = "uint8"  # 8-bit codes of 8-bit sources; the manifest's mapping gives back the exact values


class StartMethod(Choice):
    auto = "auto"  # fork where the platform has it
    fork = "fork"
    spawn = "spawn"
    forkserver = "forkserver"


class TransformName(Choice):
    none = "none"
    flip_crop = "flip_crop"
    normalize = "normalize"
    random_resized_crop = "random_resized_crop"


class Optimizer(Choice):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


MODEL_NAMES = ("mlp", "cnn")  # conf/model/<name>.yaml; pipeline/training/models.py builds them
DEVICES = "auto | cpu | cuda | cuda:N | mps"


def _is_device(v: Any) -> bool:
    return isinstance(v, str) and (v in ("auto", "cpu", "cuda", "mps") or v.startswith("cuda:"))


@dataclass
class SourceConfig:
    """Base of every source's schema (each in its module under pipeline/data/sources/)."""

    name: str = MISSING


@dataclass
class StorageConfig:
    """Base of every storage format's schema (each in its module under pipeline/data/storage/)."""

    name: str = MISSING
    dtype: StoredDtype = StoredDtype.source  # uint8: 1 byte per value (docs/compact-samples.md)


@dataclass
class SplitConfig:
    ratio: float = number(0.8, above=0.0, below=1.0, valid="must be strictly between 0 and 1, e.g. 0.8")
    seed: int = 0
    stratify: bool = True


@dataclass
class LoaderConfig:
    batch_size: int = at_least(1, 64)
    shuffle: bool = True
    # loader worker processes; auto: the last pipeline-tune for this machine and data, else a rule
    # (pipeline/tune/auto.py, docs/tuning.md)
    num_workers: Any = auto_or_at_least(0, 0)
    pin_memory: str = one_of(TRISTATE, "auto")  # auto (only with CUDA) | true | false
    prefetch_factor: int = at_least(1, 2)  # passed only when num_workers > 0
    persistent_workers: bool = True  # workers started once per loader, not per epoch (with num_workers > 0)
    drop_last: bool = False
    multiprocessing_context: StartMethod = StartMethod.auto
    thread_prefetch: int = at_least(0, 0)  # batches a background thread prepares ahead (in-process); 0 = off
    # threads that read/decode/transform the parts of each batch side by side, in whichever process
    # assembles it (the main process, or each worker); 0 = one (pipeline/training/handoff/assemble.py);
    # auto: as num_workers
    decode_threads: Any = auto_or_at_least(0, 0)


def _pair_in(low: float, high: float):
    def ok(v: Any) -> bool:
        items = list(v) if OmegaConf.is_list(v) or isinstance(v, (list, tuple)) else None
        return (
            items is not None
            and len(items) == 2
            and all(is_number(i) and low < i <= high for i in items)
            and items[0] <= items[1]
        )

    return ok


@dataclass
class TransformConfig:
    """Per-sample train-time augmentation and resizing, where each batch is read
    (pipeline/training/transforms.py), and input normalisation (in the model)."""

    name: TransformName = TransformName.none
    flip: bool = False  # random horizontal flip, p = 0.5 per sample
    # random crop of the original size from the image zero-padded by this many pixels
    crop_padding: int = at_least(0, 0)
    resized_crop: bool = (
        False  # random crop of ``scale`` x the area, aspect in ``ratio``, resized to ``size``
    )
    # [H, W] the model sees (train: the crop resized to it; val: the image resized); null: the stored size
    size: Optional[List[int]] = int_list(None, length=2, valid="null or [H, W] >= 1", optional=True)
    scale: List[float] = constrained([0.08, 1.0], _pair_in(0.0, 1.0), "[low, high] with 0 < low <= high <= 1")
    ratio: List[float] = constrained([0.75, 4 / 3], _pair_in(0.0, 100.0), "[low, high] with 0 < low <= high")
    normalize: bool = False  # (x - mean) / std per channel, mean and std measured on the train split


@dataclass
class ModelConfig:
    name: str = MISSING


DROPOUT = "must be in [0, 1)"


@dataclass
class MLPConfig(ModelConfig):
    name: str = "mlp"
    hidden: List[int] = int_list([256, 128], valid="a non-empty list of integers >= 1")
    dropout: float = number(0.0, at_least=0.0, below=1.0, valid=DROPOUT)


@dataclass
class CNNConfig(ModelConfig):
    name: str = "cnn"
    channels: List[int] = int_list([16, 32], valid="a non-empty list of integers >= 1")
    hidden: int = at_least(1, 128)
    dropout: float = number(0.0, at_least=0.0, below=1.0, valid=DROPOUT)


@dataclass
class TrainerConfig:
    epochs: int = at_least(1, 5)
    optimizer: Optimizer = Optimizer.adam
    lr: float = number(1e-3, above=0.0, valid="must be a finite number > 0, e.g. 0.001")
    weight_decay: float = number(0.0, at_least=0.0, valid="must be a finite number >= 0")
    momentum: float = number(0.9, at_least=0.0, valid="must be a finite number >= 0")  # sgd only
    device: str = constrained("auto", _is_device, DEVICES)  # auto: cuda when present
    seed: int = 0
    # auto (cores // parallel jobs: pipeline/training/threads.py) | N >= 1
    torch_threads: Any = auto_or_at_least(1, "auto")
    deterministic: bool = True  # torch.use_deterministic_algorithms (warn-only) + cudnn settings
    checkpoint: bool = True  # a checkpoint in <output_dir>/checkpoints at each epoch end
    keep_checkpoints: int = at_least(0, 2)  # the newest N checkpoints are kept; 0 keeps all
    # an MLflow run id, a run dir or a checkpoint file to continue from
    resume: Optional[str] = text(
        None, optional=True, valid="null, an MLflow run id, a run directory or a checkpoint file"
    )
    # abort when memory/used_mb crosses it; null = no budget
    memory_budget_mb: Optional[float] = number(
        None, above=0.0, optional=True, valid="must be null (no budget) or a number of MB > 0, e.g. 4000"
    )
    memory_interval_s: float = number(  # how often the memory sampler reads /proc
        0.5, above=0.0, valid="must be a number of seconds > 0, e.g. 0.5"
    )


URI_EXAMPLE = "a non-empty string, e.g. uri=sqlite:////abs/mlflow.db or http://127.0.0.1:5000"


@dataclass
class TrackingConfig:
    # one SQLite store for the whole project (absolute path), unless MLFLOW_TRACKING_URI says otherwise
    uri: str = text('${oc.env:MLFLOW_TRACKING_URI,"sqlite:///${paths.outputs}/mlflow.db"}', valid=URI_EXAMPLE)
    experiment: str = text("pipeline", valid="a non-empty string, e.g. pipeline")
    artifact_location: Optional[str] = "${paths.outputs}/mlartifacts"  # when a local store creates it
    run_name: Optional[str] = None
    log_model: bool = True  # the final model as the run's ``model`` artifact (mlflow.pytorch, pickle)
    # how often a running job rewrites its run's pipeline.heartbeat tag
    heartbeat_s: float = number(30.0, above=0.0, valid="seconds > 0, e.g. 30")
    reap: bool = True  # at start, end KILLED the experiment's RUNNING runs whose process is dead
    # a run from another host is dead once its heartbeat is this old (>= 2 x heartbeat_s: validate.py)
    stale_after_s: float = number(300.0, at_least=0.0, valid="seconds >= 2 x tracking.heartbeat_s, e.g. 300")


@dataclass
class PathsConfig:
    root: str = "${project_root:}"  # $PIPELINE_ROOT, else this checkout (pipeline/config/resolvers.py)
    outputs: str = "${paths.root}/outputs"
    # exports, shared by every run: a folder, or s3://bucket/prefix (docs/object-storage.md)
    data_dir: str = "${paths.outputs}/data"
    # local copies of data in object storage: shards being read (bounded by storage.cache_limit_mb), a
    # published export's small files, exports being built before they are published
    cache_dir: str = "${paths.outputs}/cache"
    output_dir: str = "${hydra:runtime.output_dir}"  # this run's folder


@dataclass
class ProgressConfig:
    """``progress=auto|true|false`` on the command line still sets ``bars`` alone (pipeline/progress.py)."""

    bars: str = one_of(TRISTATE, "auto")  # progress bars: auto (interactive terminal, not CI/multirun)
    # where bars are off: one log line per this many seconds of a long phase; 0 = none
    log_every_s: float = number(30.0, at_least=0.0, valid="seconds >= 0 (0: no lines)")


class ExportEngine(Choice):
    local = "local"  # worker processes on this machine (1 worker: this process, the serial path)
    dask = "dask"  # a Dask distributed cluster: export.address, or a local one started for the export


@dataclass
class ExportConfig:
    """Where the export's work runs (pipeline/data/engines/); not part of the export's fingerprint: the
    files and content_sha256 are the same for any setting."""

    # auto: the CPUs this process may use (cgroup quota, affinity); 1: the serial path in this process
    workers: Any = auto_or_at_least(1, "auto")
    engine: ExportEngine = ExportEngine.local
    # a Dask scheduler to join (engine=dask), e.g. tcp://10.0.0.5:8786; null: a local cluster for the export
    address: Optional[str] = text(
        None, optional=True, valid="null or a Dask scheduler address, e.g. tcp://h:8786"
    )
    tasks_per_worker: int = at_least(1, 4)  # pieces in flight per worker: memory holds this x workers pieces


@dataclass
class Config:
    source: SourceConfig = MISSING
    storage: StorageConfig = MISSING
    export: ExportConfig = field(default_factory=ExportConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    model: ModelConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    objective: str = "val/accuracy"  # the final-epoch metric the job returns to Hydra sweepers
    verify: bool = False  # re-hash every exported file before training (the size/mtime check always runs)
    # Any: ``progress=false`` (a scalar) replaces the node and means progress.bars=false
    progress: Any = field(default_factory=ProgressConfig)


def register_storage_schema(name: str, node: type, *, option: bool = False) -> None:
    """``node`` as ``storage/base_<name>`` (what conf/storage/<name>.yaml extends), and with ``option`` as
    ``storage/<name>`` itself (a format registered from code, with no YAML)."""
    cs = ConfigStore.instance()
    cs.store(group="storage", name=f"base_{name}", node=node)
    if option:
        cs.store(group="storage", name=name, node=node)


def register_source_schema(name: str, node: type, *, option: bool = False) -> None:
    """``node`` as ``source/base_<name>``, and with ``option`` as ``source/<name>`` itself."""
    cs = ConfigStore.instance()
    cs.store(group="source", name=f"base_{name}", node=node)
    if option:
        cs.store(group="source", name=name, node=node)


def register_configs() -> None:
    """base_config; a base_<name> per source and storage format (their own modules' dataclasses, found by
    pipeline.data.sources.sources() and pipeline.data.storage.formats()) and per model. ``Config``'s fields
    type the rest: transform's options name no base, and split, loader, trainer, tracking and paths have no
    options, only keys."""
    from pipeline.data.sources import sources
    from pipeline.data.storage import formats

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name, kind in sources().items():
        register_source_schema(name, kind.config)
    for name, fmt in formats().items():
        register_storage_schema(name, fmt.config)
    cs.store(group="model", name="base_mlp", node=MLPConfig)
    cs.store(group="model", name="base_cnn", node=CNNConfig)
