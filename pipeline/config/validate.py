"""Checks of a composed config that composition cannot express, before any data work starts.

    from pipeline.config.validate import ConfigError, validate
    validate(cfg)  # raises ConfigError("Invalid config: loader.batch_size=0 -- must be an integer >= 1")

Types, unknown keys and unknown group options fail earlier, when Hydra composes against the schemas
(pipeline/config/schema.py); ``validate`` checks values against each other and names the key, the value
given and what would be valid.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.metrics import OBJECTIVES  # metrics logged every epoch that have a direction


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is valid."""

    def __init__(self, key: str, value: Any, valid: str):
        self.key, self.value, self.valid = key, value, valid
        super().__init__(f"Invalid config: {key}={value!r} -- {valid}")


TRISTATE = ("auto", "true", "false")


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
    from pipeline.config.schema import MODEL_NAMES
    from pipeline.data.sources import SOURCES
    from pipeline.data.storage import FORMATS

    src, sto = cfg.source, cfg.storage
    _check(src.name in SOURCES, "source.name", src.name, f"one of {sorted(SOURCES)}")
    _check(sto.name in FORMATS, "storage.name", sto.name, f"one of {sorted(FORMATS)}")
    _check(cfg.model.name in MODEL_NAMES, "model.name", cfg.model.name, f"one of {MODEL_NAMES}")

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
        _check(math.isfinite(src.noise) and src.noise >= 0, "source.noise", src.noise, "must be >= 0")
    if src.name == "lfw":
        _check(0 < src.resize <= 1.0, "source.resize", src.resize, "must be in (0, 1]")
        _positive_int(cfg, "source.min_faces_per_person", 0)
        _check(src.download_timeout_s > 0, "source.download_timeout_s", src.download_timeout_s, "> 0")
        _positive_int(cfg, "source.download_retries", 0)

    if sto.name == "encoded":
        _check_encoded(cfg)
    elif OmegaConf.select(sto, "dtype", default="source") == "uint8":
        from pipeline.data.quantize import NotEightBit, divisor_for

        try:
            divisor_for(src)
        except NotEightBit as err:
            raise ConfigError(
                "storage.dtype",
                "uint8",
                f"{err}. 8-bit storage needs 8-bit values: source=lfw with source.color=true, "
                "image_folder, digits, or synthetic with source.dtype=uint8; or keep storage.dtype=source",
            ) from None

    if sto.name in ("shards", "encoded"):
        _check(
            sto.shard_size_mb > 0,
            "storage.shard_size_mb",
            sto.shard_size_mb,
            "must be > 0 (MiB per shard file), e.g. 64",
        )
        _positive_int(cfg, "storage.shuffle_buffer_shards", 1)
    if sto.name == "memmap":
        _positive_int(cfg, "storage.io_threads", 1)

    if src.name == "image_folder":
        _check(
            not OmegaConf.is_missing(src, "root"), "source.root", "???", "set it to a folder of class folders"
        )
        _check(Path(src.root).expanduser().is_dir(), "source.root", src.root, "must be an existing folder")
        size = list(src.size)
        _check(
            len(size) == 2 and all(_is_int(d) and d >= 1 for d in size), "source.size", size, "[H, W] >= 1"
        )
        _check(len(src.extensions) >= 1, "source.extensions", list(src.extensions), "e.g. [.png, .jpg]")
        _positive_int(cfg, "source.chunk_size", 1)

    _check_transform(cfg)

    _check_progress(cfg)

    ratio = cfg.split.ratio
    _check(0.0 < ratio < 1.0, "split.ratio", ratio, "must be strictly between 0 and 1, e.g. 0.8")

    _positive_int(cfg, "loader.batch_size", 1)
    check_sizes(cfg)
    _positive_int(cfg, "loader.num_workers", 0)
    _positive_int(cfg, "loader.prefetch_factor", 1)
    _positive_int(cfg, "loader.thread_prefetch", 0)
    pin = str(cfg.loader.pin_memory).lower()
    _check(pin in TRISTATE, "loader.pin_memory", cfg.loader.pin_memory, f"one of {TRISTATE}")

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
    _check_tracking(cfg.tracking)
    for key in ("uri", "experiment"):
        value = cfg.tracking[key]
        _check(
            isinstance(value, str) and value.strip() != "",
            f"tracking.{key}",
            value,
            "a non-empty string, e.g. uri=sqlite:////abs/mlflow.db or http://127.0.0.1:5000",
        )


def check_sizes(cfg: DictConfig, n: int | None = None) -> None:
    """Split and batch sizes against the sample count ``n``; by default the count a source knows from
    its config alone (digits, synthetic). Sources that learn it only by exporting (lfw, image folders)
    are checked again with the real count once exported (pipeline/job.py)."""
    if n is None:
        from pipeline.data.sources import declared_count

        n = declared_count(cfg.source)
    if n is None:
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


EIGHT_BIT_IMAGES = (
    "source=image_folder, lfw with source.color=true, digits, or synthetic with source.dtype=uint8 and "
    "source.shape [H, W] or [H, W, 3]"
)


def _check_encoded(cfg: DictConfig) -> None:
    """storage=encoded: a valid codec setting, and a source of 8-bit images (the codec takes uint8 codes)."""
    from pipeline.data.codec import problem
    from pipeline.data.quantize import NotEightBit, divisor_for

    sto, src = cfg.storage, cfg.source
    why = problem(str(sto.codec), sto.quality)
    _check(why is None, "storage.quality", sto.quality, f"{why} (storage.codec={sto.codec})")
    _check(
        str(sto.dtype) == "uint8",
        "storage.dtype",
        str(sto.dtype),
        "storage=encoded stores the source's 8-bit codes: leave storage.dtype=uint8 (its default)",
    )
    try:
        divisor_for(src)
    except NotEightBit as err:
        raise ConfigError(
            "storage",
            "encoded",
            f"{err}. storage=encoded encodes 8-bit images: {EIGHT_BIT_IMAGES}; or use storage=shards",
        ) from None
    if src.name == "synthetic":
        shape = list(src.shape)
        _check(
            len(shape) == 2 or (len(shape) == 3 and shape[2] == 3),
            "storage",
            "encoded",
            f"source=synthetic with source.shape={shape}: a codec takes images of [H, W] (grey) or [H, W, 3] "
            f"(RGB). storage=encoded encodes 8-bit images: {EIGHT_BIT_IMAGES}; or use storage=shards",
        )


def _check_transform(cfg: DictConfig) -> None:
    t = OmegaConf.select(cfg, "transform")
    if t is None:
        return
    _positive_int(cfg, "transform.crop_padding", 0)
    if (t.flip or t.crop_padding) and cfg.source.name == "synthetic":
        shape = list(cfg.source.shape)
        _check(
            len(shape) in (2, 3),
            "transform.name",
            str(t.name),
            f"flip and crop need images, [H, W] or [H, W, C]; source.shape={shape} is not one "
            "(use transform=none or transform=normalize)",
        )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_progress(cfg: DictConfig) -> None:
    node = cfg.progress
    if not OmegaConf.is_config(node):  # progress=auto|true|false: the bars switch alone
        _check(str(node).lower() in TRISTATE, "progress", node, f"one of {TRISTATE} (or set progress.bars)")
        return
    _check(str(node.bars).lower() in TRISTATE, "progress.bars", node.bars, f"one of {TRISTATE}")
    every = node.log_every_s
    _check(_is_number(every) and every >= 0, "progress.log_every_s", every, "seconds >= 0 (0: no lines)")


def _check_tracking(tracking: DictConfig) -> None:
    beat = tracking.heartbeat_s
    _check(_is_number(beat) and beat > 0, "tracking.heartbeat_s", beat, "seconds > 0, e.g. 30")
    stale = tracking.stale_after_s
    _check(
        _is_number(stale) and stale >= 2 * beat,
        "tracking.stale_after_s",
        stale,
        f"seconds >= 2 x tracking.heartbeat_s ({2 * beat:g}), e.g. 300: a run whose heartbeat is older "
        "is taken for dead",
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
    from pipeline.system.memory import snapshot

    base = snapshot().used_mb
    _check(
        budget > base,
        "trainer.memory_budget_mb",
        budget,
        f"too small to start: this process already uses {base:.0f} MB (memory/used_mb), which it already "
        f"holds before loading any data (Python, torch and the pipeline's libraries); give at least "
        f"{base + 100:.0f}, or null for no budget",
    )
