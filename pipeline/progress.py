"""Progress bars (tqdm) for long loops, shown only where a person is watching a terminal.

    from pipeline import progress
    progress.configure(cfg.progress)            # auto | true | false (job.py does this)
    for x, y in progress.samples(source.chunks(), total=n, desc="export"):   # counts samples
        ...
    for x, y in progress.batches(train_loader, "epoch 1/5"):
        ...

``auto`` (the default) shows bars only when stderr is a terminal, the ``CI`` environment variable
is unset (or false) and the job is not part of a Hydra multirun; ``true`` always shows them,
``false`` never does. When bars are off, ``track`` returns the iterable itself: no overhead.
Log records emitted while a bar is shown are written above it, so bars and log lines do not mix.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
SETTINGS = ("auto", "true", "false")

_setting = "auto"


def configure(setting) -> None:
    """Set the switch for this process: auto | true | false (booleans accepted)."""
    global _setting
    value = str(setting).lower()
    if value not in SETTINGS:
        raise ValueError(f"progress={setting!r}: must be one of {SETTINGS}")
    _setting = value


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # no Hydra context, or an incomplete one
        return False


def _is_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def enabled(setting: str | None = None) -> bool:
    value = str(setting if setting is not None else _setting).lower()
    if value in ("true", "false"):
        return value == "true"
    return sys.stderr.isatty() and not _is_ci() and not _in_multirun()


def track(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    weight: Callable[[T], int] | None = None,
) -> Iterable[T]:
    """``iterable`` itself when bars are off; else a generator advancing a bar by ``weight(item)``."""
    if not enabled():
        return iterable
    return _bar(iterable, total, desc, unit, weight)


def len1(item) -> int:
    """Weight of an ``(x, y)`` chunk or batch: its number of samples."""
    return len(item[1])


def samples(chunks: Iterable, total: int, desc: str) -> Iterable:
    """``(x, y)`` chunks or batches with a bar counting samples, ``total`` in all."""
    return track(chunks, total=total, desc=desc, unit="sample", weight=len1)


def batches(loader, desc: str) -> Iterable:
    """A DataLoader's batches with a bar counting samples (``len(loader.dataset)`` in all)."""
    return samples(loader, len(loader.dataset), desc)


def _bar(iterable, total, desc, unit, weight) -> Iterator:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with (
        logging_redirect_tqdm(),
        tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True) as bar,
    ):
        for item in iterable:
            yield item
            bar.update(weight(item) if weight is not None else 1)
