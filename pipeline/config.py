"""Config schemas and semantic validation.

Every config group option in ``conf/`` extends one of the dataclasses below (registered in Hydra's
ConfigStore as ``base_*``), so a wrong type or an unknown key fails when Hydra composes the config.
``validate(cfg)`` then checks values against each other and against what the code supports, and raises
``ConfigError`` naming the key, the value given and what would be valid -- before any data work starts.

    from pipeline.config import validate
    validate(cfg)  # raises ConfigError("loader.batch_size=0: must be an integer >= 1")
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> str:
    """Where ``outputs/`` lives: $PIPELINE_ROOT, else the source checkout, else the working directory."""
    if os.environ.get("PIPELINE_ROOT"):
        return str(Path(os.environ["PIPELINE_ROOT"]).resolve())
    checkout = PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").exists() and (checkout / "conf").is_dir():
        return str(checkout)
    return str(Path.cwd())


OmegaConf.register_new_resolver("project_root", project_root, replace=True)
import pipeline.distributed  # noqa: E402,F401  registers the run_stamp resolver (Hydra run dirs)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is valid."""

    def __init__(self, key: str, value: Any, valid: str):
        self.key, self.value, self.valid = key, value, valid
        super().__init__(f"Invalid config: {key}={value!r} -- {valid}")


# ----------------------------------------------------------------------------------------------
# Schemas
# ----------------------------------------------------------------------------------------------


@dataclass
class SourceConfig:
    name: str = MISSING


@dataclass
class DigitsConfig(SourceConfig):
    name: str = "digits"


@dataclass
class LFWConfig(SourceConfig):
    name: str = "lfw"
    data_home: Optional[str] = None  # scikit-learn's cache folder; default ~/scikit_learn_data
    min_faces_per_person: int = 0
    resize: float = 0.5
    color: bool = False
    funneled: bool = True
    download_if_missing: bool = True
    download_timeout_s: float = 20.0  # per network attempt
    download_retries: int = 3  # further attempts after a failed download (1 s apart)


@dataclass
class SyntheticConfig(SourceConfig):
    name: str = "synthetic"
    num_samples: int = 10_000
    shape: List[int] = field(default_factory=lambda: [62, 47])
    num_classes: int = 10
    dtype: str = "float32"
    seed: int = 0
    noise: float = 1.0
    block_size: int = 1024  # samples generated per block; part of the data's definition


@dataclass
class ImageFolderConfig(SourceConfig):
    name: str = "image_folder"
    root: str = MISSING  # one sub-folder per class
    mode: str = "L"  # L (grey, [H, W]) | RGB ([H, W, 3])
    size: List[int] = field(default_factory=lambda: [64, 64])  # [H, W]
    extensions: List[str] = field(default_factory=lambda: [".png", ".jpg", ".jpeg"])
    on_error: str = "skip"  # skip | fail: what an unreadable file or an escaping link does
    check: str = "full"  # full (decode while listing) | header (faster; see sources/image_folder.py)
    chunk_size: int = 256


@dataclass
class StorageConfig:
    name: str = MISSING


@dataclass
class PtStorageConfig(StorageConfig):
    name: str = "pt"


@dataclass
class NpyStorageConfig(StorageConfig):
    name: str = "npy"


@dataclass
class MemmapStorageConfig(StorageConfig):
    name: str = "memmap"


@dataclass
class ShardsStorageConfig(StorageConfig):
    name: str = "shards"
    shard_size_mb: float = 64.0  # MiB per shard file (at least one sample per shard)
    shuffle_buffer_shards: int = 4  # read-time: shards whose samples are shuffled together


@dataclass
class RamStorageConfig(StorageConfig):
    name: str = "ram"


@dataclass
class SplitConfig:
    ratio: float = 0.8
    seed: int = 0
    stratify: bool = True


@dataclass
class LoaderConfig:
    batch_size: int = 64
    shuffle: bool = True
    num_workers: int = 0
    pin_memory: str = "auto"  # auto (only with CUDA) | true | false
    prefetch_factor: int = 2  # passed only when num_workers > 0
    persistent_workers: bool = False  # passed only when num_workers > 0
    drop_last: bool = False
    multiprocessing_context: str = "auto"  # auto (fork where available) | fork | spawn | forkserver
    thread_prefetch: int = 0  # batches a background thread prepares ahead (in-process); 0 = off


@dataclass
class ModelConfig:
    name: str = MISSING


@dataclass
class MLPConfig(ModelConfig):
    name: str = "mlp"
    hidden: List[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0


@dataclass
class CNNConfig(ModelConfig):
    name: str = "cnn"
    channels: List[int] = field(default_factory=lambda: [16, 32])
    hidden: int = 128
    dropout: float = 0.0


@dataclass
class TrainerConfig:
    epochs: int = 5
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    seed: int = 0
    torch_threads: Any = "auto"  # auto (cores // parallel jobs, see pipeline/threads.py) | N >= 1
    deterministic: bool = True  # torch.use_deterministic_algorithms (warn-only) + cudnn settings
    checkpoint: bool = True  # a checkpoint in <output_dir>/checkpoints at each epoch end
    keep_checkpoints: int = 2  # the newest N checkpoints are kept; 0 keeps all
    resume: Optional[str] = None  # an MLflow run id, a run dir or a checkpoint file to continue from
    memory_budget_mb: Optional[float] = None  # abort when memory/used_mb crosses it; null = no budget
    memory_interval_s: float = 0.5  # how often the memory sampler reads /proc


@dataclass
class TrackingConfig:
    uri: str = MISSING
    experiment: str = "pipeline"
    artifact_location: Optional[str] = None  # used only when a local store creates the experiment
    run_name: Optional[str] = None
    log_model: bool = True  # the final model as the run's ``model`` artifact (mlflow.pytorch, pickle)


@dataclass
class PathsConfig:
    root: str = MISSING
    outputs: str = MISSING
    data_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class Config:
    source: Any = MISSING
    storage: Any = MISSING
    split: SplitConfig = field(default_factory=SplitConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    objective: str = "val/accuracy"  # the final-epoch metric the job returns to Hydra sweepers
    verify: bool = False  # re-hash every exported file before training (the size/mtime check always runs)
    progress: str = "auto"  # progress bars: auto (interactive terminal only) | true | false


@dataclass
class BenchOptions:
    """``python -m pipeline.bench``: the grid it measures and how long it measures each point."""

    storages: List[str] = field(default_factory=lambda: ["pt", "memmap", "shards"])
    num_workers: List[int] = field(default_factory=lambda: [0])
    batch_sizes: List[int] = field(default_factory=lambda: [64])
    thread_prefetch: List[int] = field(default_factory=lambda: [0])
    min_passes: int = 2  # timed passes over the train split (after one warm-up pass), at least
    min_seconds: float = 1.0  # ... and at least this long in total
    max_passes: int = 100
    seed: int = 0


@dataclass
class BenchConfig:
    source: Any = MISSING
    storage: Any = MISSING
    split: SplitConfig = field(default_factory=SplitConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    bench: BenchOptions = field(default_factory=BenchOptions)
    progress: str = "auto"  # progress bars (exports): auto | true | false


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(name="base_bench", node=BenchConfig)
    for group, name, node in [
        ("source", "base_digits", DigitsConfig),
        ("source", "base_lfw", LFWConfig),
        ("source", "base_synthetic", SyntheticConfig),
        ("source", "base_image_folder", ImageFolderConfig),
        ("storage", "base_pt", PtStorageConfig),
        ("storage", "base_npy", NpyStorageConfig),
        ("storage", "base_memmap", MemmapStorageConfig),
        ("storage", "base_shards", ShardsStorageConfig),
        ("storage", "base_ram", RamStorageConfig),
        ("split", "base_split", SplitConfig),
        ("loader", "base_loader", LoaderConfig),
        ("model", "base_mlp", MLPConfig),
        ("model", "base_cnn", CNNConfig),
        ("trainer", "base_trainer", TrainerConfig),
        ("tracking", "base_tracking", TrackingConfig),
        ("paths", "base_paths", PathsConfig),
    ]:
        cs.store(group=group, name=name, node=node)


register_configs()

# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

SYNTHETIC_DTYPES = ("float16", "float32", "float64", "uint8")
OPTIMIZERS = ("adam", "adamw", "sgd")
MP_CONTEXTS = ("auto", "fork", "spawn", "forkserver")
TRISTATE = ("auto", "true", "false")
OBJECTIVES = (
    "val/accuracy",
    "val/loss",
    "train/accuracy",
    "train/loss",
    "perf/train_samples_per_s",
    "perf/epoch_seconds",
    "perf/data_wait_fraction",
)


def _check(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(key, value, valid)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    v = OmegaConf.select(cfg, key)
    _check(_is_int(v) and v >= minimum, key, v, f"must be an integer >= {minimum}")


def validate(cfg: DictConfig) -> None:
    """Check every user-settable value; raise ConfigError on the first bad one."""
    from pipeline.models import MODELS
    from pipeline.sources import SOURCES
    from pipeline.storage import FORMATS

    src, sto = cfg.source, cfg.storage
    _check(src.name in SOURCES, "source.name", src.name, f"one of {sorted(SOURCES)}")
    _check(sto.name in FORMATS, "storage.name", sto.name, f"one of {sorted(FORMATS)}")
    _check(cfg.model.name in MODELS, "model.name", cfg.model.name, f"one of {sorted(MODELS)}")

    if src.name == "synthetic":
        _positive_int(cfg, "source.num_samples", 2)
        _positive_int(cfg, "source.num_classes", 1)
        _positive_int(cfg, "source.block_size", 1)
        shape = list(src.shape)
        _check(
            len(shape) >= 1 and all(_is_int(d) and d >= 1 for d in shape),
            "source.shape",
            shape,
            "a non-empty list of integers >= 1, e.g. [62, 47]",
        )
        _check(src.dtype in SYNTHETIC_DTYPES, "source.dtype", src.dtype, f"one of {SYNTHETIC_DTYPES}")
        _check(math.isfinite(src.noise) and src.noise >= 0, "source.noise", src.noise, "must be >= 0")
    if src.name == "lfw":
        _check(0 < src.resize <= 1.0, "source.resize", src.resize, "must be in (0, 1]")
        _positive_int(cfg, "source.min_faces_per_person", 0)
        _check(src.download_timeout_s > 0, "source.download_timeout_s", src.download_timeout_s, "> 0")
        _positive_int(cfg, "source.download_retries", 0)

    if sto.name == "shards":
        _check(
            sto.shard_size_mb > 0,
            "storage.shard_size_mb",
            sto.shard_size_mb,
            "must be > 0 (MiB per shard file), e.g. 64",
        )
        _positive_int(cfg, "storage.shuffle_buffer_shards", 1)

    if src.name == "image_folder":
        _check(
            not OmegaConf.is_missing(src, "root"), "source.root", "???", "set it to a folder of class folders"
        )
        _check(Path(src.root).expanduser().is_dir(), "source.root", src.root, "must be an existing folder")
        _check(src.mode in ("L", "RGB"), "source.mode", src.mode, "L (grey) or RGB")
        size = list(src.size)
        _check(
            len(size) == 2 and all(_is_int(d) and d >= 1 for d in size), "source.size", size, "[H, W] >= 1"
        )
        _check(len(src.extensions) >= 1, "source.extensions", list(src.extensions), "e.g. [.png, .jpg]")
        _check(src.on_error in ("skip", "fail"), "source.on_error", src.on_error, "skip or fail")
        _check(src.check in ("full", "header"), "source.check", src.check, "full or header")
        _positive_int(cfg, "source.chunk_size", 1)

    _check(str(cfg.progress).lower() in TRISTATE, "progress", cfg.progress, f"one of {TRISTATE}")

    ratio = cfg.split.ratio
    _check(0.0 < ratio < 1.0, "split.ratio", ratio, "must be strictly between 0 and 1, e.g. 0.8")

    _positive_int(cfg, "loader.batch_size", 1)
    _check_sizes(cfg)
    _positive_int(cfg, "loader.num_workers", 0)
    _positive_int(cfg, "loader.prefetch_factor", 1)
    _positive_int(cfg, "loader.thread_prefetch", 0)
    pin = str(cfg.loader.pin_memory).lower()
    _check(pin in TRISTATE, "loader.pin_memory", cfg.loader.pin_memory, f"one of {TRISTATE}")
    ctx = cfg.loader.multiprocessing_context
    _check(ctx in MP_CONTEXTS, "loader.multiprocessing_context", ctx, f"one of {MP_CONTEXTS}")

    _positive_int(cfg, "trainer.epochs", 1)
    threads = cfg.trainer.torch_threads
    _check(
        threads == "auto" or (_is_int(threads) and threads >= 1),
        "trainer.torch_threads",
        threads,
        "auto or an integer >= 1",
    )
    objective = OmegaConf.select(cfg, "objective", default="val/accuracy")
    _check(objective in OBJECTIVES, "objective", objective, f"one of {OBJECTIVES}")
    _positive_int(cfg, "trainer.keep_checkpoints", 0)
    resume = cfg.trainer.resume
    _check(
        resume is None or (isinstance(resume, str) and resume.strip() != ""),
        "trainer.resume",
        resume,
        "null, an MLflow run id, a run directory or a checkpoint file",
    )
    lr = cfg.trainer.lr
    _check(math.isfinite(lr) and lr > 0, "trainer.lr", lr, "must be a finite number > 0, e.g. 0.001")
    wd = cfg.trainer.weight_decay
    _check(math.isfinite(wd) and wd >= 0, "trainer.weight_decay", wd, "must be a finite number >= 0")
    mom = cfg.trainer.momentum
    _check(math.isfinite(mom) and mom >= 0, "trainer.momentum", mom, "must be a finite number >= 0")
    opt = cfg.trainer.optimizer
    _check(opt in OPTIMIZERS, "trainer.optimizer", opt, f"one of {OPTIMIZERS}")
    dev = cfg.trainer.device
    _check(
        dev in ("auto", "cpu", "cuda", "mps") or str(dev).startswith("cuda:"),
        "trainer.device",
        dev,
        "auto | cpu | cuda | cuda:N | mps",
    )

    _check_memory(cfg.trainer)

    model = cfg.model
    for key in ("hidden", "channels"):
        if key in model and OmegaConf.is_list(model[key]):
            vals = list(model[key])
            _check(
                len(vals) >= 1 and all(_is_int(v) and v >= 1 for v in vals),
                f"model.{key}",
                vals,
                "a non-empty list of integers >= 1",
            )
    if model.name == "cnn":
        _positive_int(cfg, "model.hidden", 1)
        if src.name == "synthetic":
            _check(
                len(src.shape) in (2, 3),
                "source.shape",
                list(src.shape),
                "model=cnn needs images: [H, W] or [H, W, C] (use model=mlp for other shapes)",
            )
    _check(0.0 <= model.dropout < 1.0, "model.dropout", model.dropout, "must be in [0, 1)")
    for key in ("uri", "experiment"):
        value = cfg.tracking[key]
        _check(
            isinstance(value, str) and value.strip() != "",
            f"tracking.{key}",
            value,
            "a non-empty string, e.g. uri=sqlite:////abs/mlflow.db or http://127.0.0.1:5000",
        )


def _check_sizes(cfg: DictConfig) -> None:
    """Split and batch sizes against the sample count, when the source knows it before export."""
    from pipeline.sources import declared_count

    n = declared_count(cfg.source)
    if n is None:  # known only after export (lfw): partition and job.py check the same things then
        return
    ratio, bs = cfg.split.ratio, cfg.loader.batch_size
    n_train = int(n * ratio)
    _check(
        0 < n_train < n,
        "split.ratio",
        ratio,
        f"leaves {'train' if n_train == 0 else 'val'} empty for the {n} samples of source={cfg.source.name} "
        f"(train would hold int({n} * {ratio}) = {n_train}); valid: 1 <= int({n} * ratio) <= {n - 1}",
    )
    _check(
        not cfg.loader.drop_last or bs <= n_train,
        "loader.batch_size",
        bs,
        f"with loader.drop_last=true it must be <= the {n_train} train samples "
        f"(split.ratio={ratio} of {n}), or no batch would ever be trained",
    )


def _check_memory(trainer: DictConfig) -> None:
    interval = trainer.memory_interval_s
    _check(
        isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval > 0,
        "trainer.memory_interval_s",
        interval,
        "must be a number of seconds > 0, e.g. 0.5",
    )
    budget = trainer.memory_budget_mb
    if budget is None:
        return
    _check(
        isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0,
        "trainer.memory_budget_mb",
        budget,
        "must be null (no budget) or a number of MB > 0, e.g. 4000",
    )
    from pipeline.memory import snapshot

    base = snapshot().used_mb
    _check(
        budget > base,
        "trainer.memory_budget_mb",
        budget,
        f"too small to start: this process already uses {base:.0f} MB (memory/used_mb), which it already "
        f"holds before loading any data (Python, torch and the pipeline's libraries); give at least "
        f"{base + 100:.0f}, or null for no budget",
    )
