"""Config schemas: every default is written here, once; conf/ YAML options hold only what differs.

    import pipeline.config   # registers these dataclasses in Hydra's ConfigStore as base_*

Every config group option in ``conf/`` extends one of the dataclasses below, so a wrong type or an
unknown key fails when Hydra composes the config. Checks that composition cannot express live in
pipeline/config/validate.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Choice(str, Enum):
    """A closed set of string options: a wrong value fails when Hydra composes, naming the valid ones.
    Members compare equal to their strings and print as them (``str(Optimizer.adam) == "adam"``)."""

    def __str__(self) -> str:
        return self.value


class SampleDtype(Choice):
    float16 = "float16"
    float32 = "float32"
    float64 = "float64"
    uint8 = "uint8"


class StoredDtype(Choice):
    source = "source"  # store what the source yields (float32 for lfw and digits, uint8 for image folders)
    uint8 = "uint8"  # 8-bit codes of 8-bit sources; the manifest's mapping gives back the exact values


class ImageMode(Choice):
    L = "L"  # grey, samples of [H, W]
    RGB = "RGB"  # samples of [H, W, 3]


class OnError(Choice):
    skip = "skip"  # name the file in the log and leave it out
    fail = "fail"  # stop the export


class ImageCheck(Choice):
    full = "full"  # decode every file while listing
    header = "header"  # read headers only (faster; a broken body fails the export, naming the file)


class StartMethod(Choice):
    auto = "auto"  # fork where the platform has it
    fork = "fork"
    spawn = "spawn"
    forkserver = "forkserver"


class TransformName(Choice):
    none = "none"
    flip_crop = "flip_crop"
    normalize = "normalize"


class ShardBuffers(Choice):
    auto = "auto"  # memory when the export is larger than half the memory the job may use, else mapped
    memory = "memory"  # copied into anonymous memory with large reads; pages dropped from the cache behind
    mapped = "mapped"  # read through memory maps, read ahead by the kernel; pages stay cached


class CodecName(Choice):
    png = "png"  # lossless
    webp = "webp"  # lossless without a quality, lossy with one
    jpeg = "jpeg"  # lossy: needs a quality


class CodecDecoder(Choice):
    imagecodecs = "imagecodecs"  # faster than Pillow: docs/compact-samples.md, "Choosing the decoder"
    pillow = "pillow"  # the reference


class Optimizer(Choice):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


MODEL_NAMES = ("mlp", "cnn")  # conf/model/<name>.yaml; pipeline/training/models.py builds them


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
    dtype: SampleDtype = SampleDtype.float32
    seed: int = 0
    noise: float = 1.0
    block_size: int = 1024  # samples generated per block; part of the data's definition


@dataclass
class ImageFolderConfig(SourceConfig):
    name: str = "image_folder"
    root: str = MISSING  # one sub-folder per class
    mode: ImageMode = ImageMode.L
    size: List[int] = field(default_factory=lambda: [64, 64])  # [H, W]
    extensions: List[str] = field(default_factory=lambda: [".png", ".jpg", ".jpeg"])
    on_error: OnError = OnError.skip  # what an unreadable file or a link leaving root does
    check: ImageCheck = ImageCheck.full
    chunk_size: int = 256


@dataclass
class StorageConfig:
    name: str = MISSING
    dtype: StoredDtype = StoredDtype.source  # uint8: 1 byte per value (docs/compact-samples.md)


@dataclass
class PtStorageConfig(StorageConfig):
    name: str = "pt"


@dataclass
class NpyStorageConfig(StorageConfig):
    name: str = "npy"


@dataclass
class MemmapStorageConfig(StorageConfig):
    name: str = "memmap"
    io_threads: int = 16  # read-time: threads waiting on a batch's rows the page cache misses


@dataclass
class ShardsStorageConfig(StorageConfig):
    name: str = "shards"
    shard_size_mb: float = 64.0  # MiB per shard file (at least one sample per shard)
    shuffle_buffer_shards: int = 4  # read-time: shards whose samples are shuffled together
    placement_seed: int = 0  # seeds the permutation placing samples in shards (mixes class-sorted sources)
    buffers: ShardBuffers = ShardBuffers.auto  # read-time: how a buffer of shards is held (see ShardBuffers)


@dataclass
class EncodedStorageConfig(ShardsStorageConfig):
    """Shards of encoded images (docs/compact-samples.md); shard_size_mb counts encoded bytes."""

    name: str = "encoded"
    dtype: StoredDtype = StoredDtype.uint8  # always: a codec takes the source's 8-bit codes
    codec: CodecName = CodecName.png  # lossless by default
    quality: Optional[int] = None  # 1..100 for lossy webp or jpeg; null: lossless (jpeg needs one)
    decoder: CodecDecoder = CodecDecoder.imagecodecs  # part of the export: lossy pixels depend on it


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
    multiprocessing_context: StartMethod = StartMethod.auto
    thread_prefetch: int = 0  # batches a background thread prepares ahead (in-process); 0 = off


@dataclass
class TransformConfig:
    """Train-time augmentation (batched, main process) and input normalisation (in the model)."""

    name: TransformName = TransformName.none
    flip: bool = False  # random horizontal flip, p = 0.5 per sample
    crop_padding: int = 0  # random crop of the original size from the image zero-padded by this many pixels
    normalize: bool = False  # (x - mean) / std per channel, mean and std measured on the train split


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
    optimizer: Optimizer = Optimizer.adam
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    seed: int = 0
    torch_threads: Any = "auto"  # auto (cores // parallel jobs: pipeline/training/threads.py) | N >= 1
    deterministic: bool = True  # torch.use_deterministic_algorithms (warn-only) + cudnn settings
    checkpoint: bool = True  # a checkpoint in <output_dir>/checkpoints at each epoch end
    keep_checkpoints: int = 2  # the newest N checkpoints are kept; 0 keeps all
    resume: Optional[str] = None  # an MLflow run id, a run dir or a checkpoint file to continue from
    memory_budget_mb: Optional[float] = None  # abort when memory/used_mb crosses it; null = no budget
    memory_interval_s: float = 0.5  # how often the memory sampler reads /proc


@dataclass
class TrackingConfig:
    # one SQLite store for the whole project (absolute path), unless MLFLOW_TRACKING_URI says otherwise
    uri: str = '${oc.env:MLFLOW_TRACKING_URI,"sqlite:///${paths.outputs}/mlflow.db"}'
    experiment: str = "pipeline"
    artifact_location: Optional[str] = "${paths.outputs}/mlartifacts"  # when a local store creates it
    run_name: Optional[str] = None
    log_model: bool = True  # the final model as the run's ``model`` artifact (mlflow.pytorch, pickle)
    heartbeat_s: float = 30.0  # how often a running job rewrites its run's pipeline.heartbeat tag
    reap: bool = True  # at start, end KILLED the experiment's RUNNING runs whose process is dead
    stale_after_s: float = 300.0  # a run from another host is dead once its heartbeat is this old


@dataclass
class PathsConfig:
    root: str = "${project_root:}"  # $PIPELINE_ROOT, else this checkout (pipeline/config/resolvers.py)
    outputs: str = "${paths.root}/outputs"
    data_dir: str = "${paths.outputs}/data"  # exports, shared by every run
    output_dir: str = "${hydra:runtime.output_dir}"  # this run's folder


@dataclass
class ProgressConfig:
    """``progress=auto|true|false`` on the command line still sets ``bars`` alone (pipeline/progress.py)."""

    bars: str = "auto"  # progress bars: auto (interactive terminal, not CI/multirun) | true | false
    log_every_s: float = (
        30.0  # where bars are off: one log line per this many seconds of a long phase; 0 = none
    )


@dataclass
class Config:
    source: SourceConfig = MISSING
    storage: StorageConfig = MISSING
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


def register_configs() -> None:
    """base_config, and a base_* per option schema of the groups whose option picks a schema (source,
    storage, model). ``Config``'s fields type the rest: transform's options name no base, and split,
    loader, trainer, tracking and paths have no options, only keys."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, name, node in [
        ("source", "base_digits", DigitsConfig),
        ("source", "base_lfw", LFWConfig),
        ("source", "base_synthetic", SyntheticConfig),
        ("source", "base_image_folder", ImageFolderConfig),
        ("storage", "base_pt", PtStorageConfig),
        ("storage", "base_npy", NpyStorageConfig),
        ("storage", "base_memmap", MemmapStorageConfig),
        ("storage", "base_shards", ShardsStorageConfig),
        ("storage", "base_encoded", EncodedStorageConfig),
        ("storage", "base_ram", RamStorageConfig),
        ("model", "base_mlp", MLPConfig),
        ("model", "base_cnn", CNNConfig),
    ]:
        cs.store(group=group, name=name, node=node)
