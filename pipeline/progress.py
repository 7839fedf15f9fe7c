"""Progress of long loops: bars where a person watches a terminal, log lines everywhere else.

    from pipeline import progress
    progress.configure(cfg.progress)     # {bars: auto|true|false, log_every_s: 30}, or auto|true|false
    for x, y in progress.samples(source.chunks(), total=n, desc="export", sample_bytes=b):
        ...
    for x, y in progress.batches(train_loader, "epoch 1/5"):
        ...

``bars``: ``auto`` (the default) shows tqdm bars only when stderr is a terminal, the ``CI`` environment
variable is unset (or false) and the job is not part of a Hydra multirun; ``true`` always shows them,
``false`` never does. ``progress=auto|true|false`` on the command line sets ``bars`` alone. Log
records emitted while a bar is shown are written above it, so bars and log lines do not mix.

Where bars are off, a loop that runs longer than ``log_every_s`` logs one INFO line every
``log_every_s`` seconds (``pipeline.progress`` logger) from a background thread, so a stalled loop
still reports; a shorter loop logs nothing extra:

    export: 12000/60000 samples (20%), 4800 samples/s, 45.1 MB/s, ETA 10 s
    epoch 2/5: 1200/3000 batches (40%), 76800 samples, 5120 samples/s, data wait 3.1 s (12%), ETA 35 s

Per batch the loop pays two ``perf_counter`` reads and a few additions (measured, with the command:
docs/tracking.md, "Cost in the training loop"). ``log_every_s=0`` turns lines off: the iterable is
returned itself.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
SETTINGS = ("auto", "true", "false")

log = logging.getLogger(__name__)

_setting = "auto"
_every_s: float | None = None  # None: ProgressConfig's default


def _default_every() -> float:
    from pipeline.config.schema import ProgressConfig

    return ProgressConfig.log_every_s


def configure(setting) -> None:
    """Set this process's switch: a ``progress`` config node (bars, log_every_s), or the bars setting
    alone (auto | true | false; booleans accepted)."""
    global _setting, _every_s
    every = None
    if hasattr(setting, "keys"):  # a config node or a dict
        every = setting.get("log_every_s")
        setting = setting.get("bars", "auto")
    value = str(setting).lower()
    if value not in SETTINGS:
        raise ValueError(f"progress={setting!r}: must be one of {SETTINGS}")
    if every is not None and not (isinstance(every, (int, float)) and every >= 0):
        raise ValueError(f"progress.log_every_s={every!r}: must be a number of seconds >= 0")
    _setting, _every_s = value, None if every is None else float(every)


def log_every_s() -> float:
    return _default_every() if _every_s is None else _every_s


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
    """Whether bars are shown."""
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
    meter: "Meter | None" = None,
) -> Iterable[T]:
    """A bar advancing by ``weight(item)``; else, with log lines on, ``iterable`` counted by ``meter``
    (default: items against ``total``); else ``iterable`` itself: no overhead."""
    if enabled():
        return _bar(iterable, total, desc, unit, weight)
    every = log_every_s()
    if every <= 0:
        return iterable
    meter = meter or Meter(desc, total)
    return _logged(iterable, meter, weight, every)


def len1(item) -> int:
    """Weight of an ``(x, y)`` chunk or batch: its number of samples."""
    return len(item[1])


def samples(chunks: Iterable, total: int, desc: str, sample_bytes: int | None = None) -> Iterable:
    """``(x, y)`` chunks or batches counting samples, ``total`` in all (MB/s in lines given their size)."""
    meter = Meter(desc, total, sample_bytes=sample_bytes)
    return track(chunks, total=total, desc=desc, unit="sample", weight=len1, meter=meter)


def batches(loader, desc: str) -> Iterable:
    """A DataLoader's batches: a bar counting samples (``len(loader.dataset)``), or lines counting
    batches against ``len(loader)`` with samples/s and the time spent waiting for data."""
    try:
        n_batches = len(loader)
    except TypeError:  # an iterable dataset
        n_batches = None
    meter = Meter(desc, n_batches, batches=True)
    return track(loader, total=len(loader.dataset), desc=desc, unit="sample", weight=len1, meter=meter)


class Meter:
    """Counters of one loop, updated by the loop and read by the thread that logs them.

    ``batches=True``: ``items`` counts batches (of ``total``), ``samples`` their samples and ``wait`` the
    seconds spent waiting for them; else ``items`` counts samples (of ``total``).
    """

    def __init__(
        self, desc: str, total: int | None, *, sample_bytes: int | None = None, batches: bool = False
    ) -> None:
        self.desc, self.total, self.sample_bytes, self.batches = desc, total, sample_bytes, batches
        self.items = 0
        self.samples = 0
        self.wait = 0.0
        self.t0 = time.perf_counter()

    def line(self) -> str:
        secs = max(time.perf_counter() - self.t0, 1e-9)
        unit = "batches" if self.batches else "samples"
        samples = self.samples if self.batches else self.items
        head = (
            f"{self.items}/{self.total} {unit} ({100 * self.items / self.total:.0f}%)"
            if self.total
            else (f"{self.items} {unit}")
        )
        parts = [head]
        if self.batches:
            parts.append(f"{samples} samples")
        parts.append(f"{samples / secs:.0f} samples/s")
        if self.sample_bytes:
            parts.append(f"{samples * self.sample_bytes / 1e6 / secs:.1f} MB/s")
        if self.batches:
            parts.append(f"data wait {self.wait:.1f} s ({100 * self.wait / secs:.0f}%)")
        if self.total and self.items:
            parts.append(f"ETA {_duration((self.total - self.items) * secs / self.items)}")
        return f"{self.desc}: " + ", ".join(parts)


def _duration(secs: float) -> str:
    secs = max(0, round(secs))
    if secs < 60:
        return f"{secs} s"
    if secs < 3600:
        return f"{secs // 60}m{secs % 60:02d}s"
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m"


class _Reporter:
    """Logs ``meter.line()`` every ``every`` seconds until stopped; nothing for a loop shorter than that."""

    def __init__(self, meter: Meter, every: float) -> None:
        self.meter, self.every = meter, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"progress {meter.desc}", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            log.info("%s", self.meter.line())

    def __enter__(self) -> "_Reporter":
        self.meter.t0 = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)  # no line about this loop once it has ended


def _logged(iterable: Iterable[T], meter: Meter, weight, every: float) -> Iterator[T]:
    with _Reporter(meter, every):
        if meter.batches:  # (x, y) batches: count them and their samples, time the wait for each
            clock = time.perf_counter
            t = clock()
            for item in iterable:
                now = clock()
                meter.wait += now - t
                meter.items += 1
                meter.samples += len(item[1])
                yield item
                t = clock()
            return
        for item in iterable:  # chunks: count their samples
            meter.items += weight(item) if weight is not None else 1
            yield item


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
