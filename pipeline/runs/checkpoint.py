"""Checkpoint files: one per epoch end in ``<run output_dir>/checkpoints/``, written atomically.

    from pipeline.runs.checkpoint import CheckpointDir, load_checkpoint, find_checkpoint
    with CheckpointDir(output_dir / "checkpoints", keep=2) as ckpts:   # holds the folder's lock
        ckpts.save(epoch=3, state={...})          # -> epoch_0003.pt (3 epochs done), older ones pruned
    state = load_checkpoint(path)                 # torch.load(weights_only=True)
    path = find_checkpoint("<run id> | <run dir> | <file>", tracking_uri)

A checkpoint is a dict of tensors and plain values (``torch.load(weights_only=True)`` reads it):
``format``, ``epoch`` (epochs completed), ``run_id`` (the MLflow run that wrote it), ``config``
(the flattened resolved config), ``model`` and ``optimizer`` state dicts, ``rng`` (see
``seeding.capture_rng``), ``samples_seen`` and ``history`` (every logged per-epoch metric so far).

It is written to a temporary file beside the target, synced, then renamed over it, so a file named
``epoch_NNNN.pt`` is always complete. While a job runs it holds an exclusive ``flock`` on
``checkpoints/.lock``; the kernel drops it when the process dies, however it dies -- so a locked
folder means its run is still alive, and resuming from it is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pipeline import fsio

DIRNAME = "checkpoints"
FORMAT = 2  # 2: samples_seen counted per epoch
LOCK = ".lock"
PATTERN = re.compile(r"epoch_(\d{4,})\.pt")
RUN_ID = re.compile(r"[0-9a-f]{32}")
OUTPUT_DIR_TAG = "pipeline.output_dir"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for."""


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return Path(directory) / f"epoch_{epoch:04d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of the complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := PATTERN.fullmatch(p.name))]
    return sorted(found)


def save_atomic(path: Path, state: dict) -> Path:
    with fsio.atomic_file(path) as fh:
        torch.save(state, fh)
    return Path(path)


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable checkpoint: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pipeline checkpoint of format {FORMAT}")
    return state


def is_locked(directory: Path) -> bool:
    """True while a live process holds ``directory``'s checkpoint lock."""
    return fsio.is_locked(Path(directory) / LOCK)


class CheckpointDir:
    """The checkpoint folder of the running job: locked for the job's life, pruned to ``keep``."""

    def __init__(self, directory: Path, keep: int = 2) -> None:
        self.directory, self.keep = Path(directory), int(keep)
        self._lock = None

    def __enter__(self) -> "CheckpointDir":
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = fsio.Lock(self.directory / LOCK)
        if not self._lock.acquire():
            raise CheckpointError(
                f"{self.directory} is locked by another live process; each run needs its own output_dir"
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def save(self, epoch: int, state: dict) -> Path:
        path = save_atomic(
            checkpoint_path(self.directory, epoch), {"format": FORMAT, "epoch": epoch, **state}
        )
        if self.keep > 0:
            for _, old in list_checkpoints(self.directory)[: -self.keep]:
                old.unlink(missing_ok=True)
        return path


def _latest_in(directory: Path, what: str) -> Path:
    found = list_checkpoints(directory)
    if not found:
        raise CheckpointError(f"no checkpoint (epoch_NNNN.pt) in {directory}, the folder of {what}")
    return found[-1][1]


def find_checkpoint(target: str, tracking_uri: str) -> Path:
    """The checkpoint ``trainer.resume=<target>`` means: a file, a run dir's newest, a run id's newest."""
    path = Path(str(target)).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        directory = path / DIRNAME if (path / DIRNAME).is_dir() else path
        return _latest_in(directory, f"run dir {path}")
    if not RUN_ID.fullmatch(str(target)):
        raise CheckpointError(
            f"trainer.resume={target!r}: no such file or folder, and not an MLflow run id (32 hex "
            "characters); give a run id, a run output dir or a checkpoint file"
        )
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri=tracking_uri).get_run(str(target))
    except MlflowException as err:
        raise CheckpointError(f"trainer.resume={target}: no such run in {tracking_uri} ({err})") from err
    output_dir = run.data.tags.get(OUTPUT_DIR_TAG)
    if not output_dir:
        raise CheckpointError(f"trainer.resume={target}: the run has no {OUTPUT_DIR_TAG} tag")
    return _latest_in(Path(output_dir) / DIRNAME, f"run {target}")
