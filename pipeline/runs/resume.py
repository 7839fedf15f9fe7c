"""Continue an interrupted run: ``pipeline <original overrides> trainer.resume=<run id | run dir | file>``.

    from pipeline.runs.resume import open_resume, snapshot
    resume = open_resume(cfg)                # None without trainer.resume; checks before any work
    resume.link(tracked_run)                 # tags both runs, marks the original KILLED if still RUNNING
    start_epoch = resume.restore(model, optimizer, train_loader, val_loader)
    state = snapshot(cfg, run_id, model, optimizer, train_loader, val_loader, history)  # -> a checkpoint

The resumed run is a new MLflow run (``pipeline.resumed_from``) that re-logs the original's epochs, then
trains the rest from the checkpoint's model, optimizer, RNGs and sampler epoch: its metrics equal an
uninterrupted run's (bitwise on CPU). The original gets ``pipeline.resumed_by``; one a SIGKILL left
RUNNING (and the reaper, pipeline/tracking/reaper.py, has not ended yet: the job's start usually has) is
ended KILLED the reaper's way, with its tags. The config must be the original's but for the keys that cannot
change the result (``FREE_KEYS``, ``FREE_PREFIXES``); any other difference is refused, listing the keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.validate import ConfigError
from pipeline.runs.checkpoint import find_checkpoint, is_locked, load_checkpoint
from pipeline.tracking.store import config_differences, flatten
from pipeline.training.seeding import capture_rng, restore_rng

log = logging.getLogger(__name__)

# keys that may differ between the original and the resumed run
FREE_PREFIXES = ("paths.", "tracking.", "progress.")
FREE_KEYS = {
    "trainer.resume",
    "trainer.epochs",
    "trainer.checkpoint",
    "trainer.keep_checkpoints",
    "trainer.memory_budget_mb",
    "trainer.memory_interval_s",
    "progress",
    "verify",
    "loader.num_workers",
    "loader.prefetch_factor",
    "loader.persistent_workers",
    "loader.pin_memory",
    "loader.multiprocessing_context",
}


def _shown(value: str | None) -> str:
    return "<absent>" if value is None else value


def _free(key: str) -> bool:
    return key in FREE_KEYS or key.startswith(FREE_PREFIXES)


@dataclass
class Resume:
    path: Path
    state: dict

    @property
    def epoch(self) -> int:
        return int(self.state["epoch"])

    @property
    def run_id(self) -> str:
        return str(self.state["run_id"])

    @property
    def samples_seen(self) -> int:
        """Train samples the original run counted up to the checkpoint."""
        return int(self.state["samples_seen"])

    @property
    def history(self) -> list[dict]:
        return [dict(row) for row in self.state["history"]]

    def link(self, tr) -> None:
        """Tag both runs; end the original KILLED if it was left RUNNING (a SIGKILL skips its cleanup)."""
        tr.set_tags(
            {
                "pipeline.resumed_from": self.run_id,
                "pipeline.resumed_from_epoch": self.epoch,
                "pipeline.resumed_from_checkpoint": str(self.path),
            }
        )
        for step, metrics in enumerate(self.history):
            tr.log_metrics(metrics, step=step)
        try:
            original = tr.client.get_run(self.run_id)
        except Exception as err:  # a checkpoint from another tracking store
            log.warning("resume: original run %s not found in this store (%s)", self.run_id, err)
            return
        tr.client.set_tag(self.run_id, "pipeline.resumed_by", tr.run_id)
        if original.info.status == "RUNNING":  # not ended yet by the reaper (tracking.reap=false, ...)
            from pipeline.tracking.reaper import end_killed

            reason = (
                f"process gone: no exit status (killed); no live process holds {self.path.parent}; "
                f"resumed by run {tr.run_id}"
            )
            end_killed(tr.client, original, reason)  # the reaper's tags: pipeline.reaped, _at, _by, error
            log.info("resume: marked the interrupted run %s KILLED", self.run_id)

    def restore(self, model, optimizer, train_loader, val_loader) -> int:
        """Load the training state; return the epoch to start at."""
        model.load_state_dict(self.state["model"])
        optimizer.load_state_dict(self.state["optimizer"])
        restore_rng(self.state["rng"], _generators(train_loader, val_loader))
        train_loader.set_epoch(self.epoch)
        log.info("resume: continuing run %s after epoch %d from %s", self.run_id, self.epoch, self.path)
        return self.epoch


def _generators(train_loader, val_loader) -> dict:
    return {"train": train_loader.generator, "val": val_loader.generator}


def open_resume(cfg) -> Resume | None:
    """Find and check the checkpoint ``trainer.resume`` names, before the run starts any work."""
    target = cfg.trainer.resume
    if target is None:
        return None
    path = find_checkpoint(target, cfg.tracking.uri)
    if is_locked(path.parent):
        raise ConfigError(
            "trainer.resume", target, f"its run is still running (a live process holds {path.parent})"
        )
    resume = Resume(path, load_checkpoint(path))
    diffs = config_differences(resume.state["config"], flatten(cfg), ignore=_free)
    if diffs:
        raise ConfigError(
            "trainer.resume",
            target,
            "the checkpoint was trained with another config; pass the original run's overrides "
            "(its hydra.overrides tag). Differences: "
            + "; ".join(f"{k}: checkpoint {_shown(a)}, now {_shown(b)}" for k, a, b in diffs),
        )
    if resume.epoch >= cfg.trainer.epochs:
        raise ConfigError(
            "trainer.resume",
            target,
            f"{path.name} already holds {resume.epoch} epochs and trainer.epochs={cfg.trainer.epochs}; "
            "raise trainer.epochs to train further",
        )
    return resume


def snapshot(cfg, run_id: str, model, optimizer, train_loader, val_loader, history: list[dict]) -> dict:
    """The checkpoint content at an epoch end (``CheckpointDir.save`` adds ``format`` and ``epoch``)."""
    return {
        "run_id": run_id,
        "config": flatten(cfg),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": capture_rng(_generators(train_loader, val_loader)),
        "samples_seen": int(history[-1]["train/samples_seen"]),  # counted, not derived
        "history": [dict(row) for row in history],
    }
