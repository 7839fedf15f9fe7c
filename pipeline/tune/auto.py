"""``loader.num_workers=auto`` and ``loader.decode_threads=auto``: resolved before the loaders are built.

    from pipeline.tune.auto import resolve
    loader_cfg, resolved = resolve(cfg, exp, device)   # stages.make_loaders does this
    resolved   # {"loader.resolved.num_workers": 2, "loader.resolved.decode_threads": 0,
               #  "loader.resolved.from": "tune <run id> (<time>)" | "rule: ..."}  -- logged as MLflow params

1. **The last tune** for this machine, this export and this job's shape (pipeline/tune/record.py), when one
   exists: its settings for the keys that say ``auto``.
2. **Else the rule** (``rule``), from what a job knows without timing anything (pipeline/tune/facts.py:
   ``Machine``, ``Data``). Workers and decode threads pay for work done on each sample -- decoding
   (``storage=encoded``) or augmenting (``transform=flip_crop``, ``random_resized_crop``) -- which they spread
   over the cores. Without such work a batch is a copy that the main process makes fastest, and other
   processes only compete with training (docs/parallel-loading.md): 0 and 0. With it, on a job with ``c >= 2``
   cores: ``num_workers = c - 1``, one core left to the training step (on 2 cores, 1 worker was the fastest
   parallel setting for photo crops, on par with none and ahead of 2 workers and of decode threads:
   docs/tuning.md), and no decode threads in the workers (they already keep the other cores busy); with
   ``num_workers=0`` set and ``decode_threads=auto``, ``c`` threads in the main process; with
   ``num_workers=N`` set, ``(c - 1) // N`` threads each when that is at least 2. One core: 0 and 0.

A key that is not ``auto`` is never changed.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from pipeline.tune import facts as facts_
from pipeline.tune import record

log = logging.getLogger(__name__)

KEYS = ("num_workers", "decode_threads")


def is_auto(value) -> bool:
    return str(value) == "auto"


def rule_workers(cores: int) -> int:
    return max(1, cores - 1)


def rule(machine: facts_.Machine, data: facts_.Data, loader) -> tuple[dict[str, int], str]:
    """Values for the ``auto`` keys of ``loader`` (see the module docstring) and why, in words."""
    cores = machine.job_cores
    want = {k: loader[k] for k in KEYS}
    if cores < 2 or not data.per_sample_work:
        why = (
            "one core for this job: loading runs in the main process"
            if cores < 2
            else "no per-sample work (no decoding, no augmentation): a batch is a copy the main process "
            "makes fastest"
        )
        return {k: 0 for k in KEYS if is_auto(want[k])}, why
    work = " and ".join(w for w, on in (("decoding", data.decoded), ("augmentation", data.augmented)) if on)
    out: dict[str, int] = {}
    workers = rule_workers(cores) if is_auto(want["num_workers"]) else int(want["num_workers"])
    if is_auto(want["num_workers"]):
        out["num_workers"] = workers
    if is_auto(want["decode_threads"]):
        if workers == 0:
            out["decode_threads"] = cores
        else:
            share = (cores - 1) // workers
            out["decode_threads"] = share if share >= 2 else 0
    return out, f"per-sample {work} on {cores} cores: spread over workers/threads"


def resolve(cfg: DictConfig, exp, device) -> tuple[DictConfig, dict]:
    """``cfg.loader`` with its ``auto`` keys resolved, and what they became (MLflow params); ``cfg.loader``
    itself when nothing says ``auto``."""
    loader = cfg.loader
    auto = [k for k in KEYS if is_auto(loader[k])]
    if not auto:
        return loader, {}
    machine = facts_.machine(facts_.device_name(device))
    shape = record.shape_of(cfg)
    found = record.read(cfg.paths.outputs, machine.fingerprint(), exp.fingerprint, shape)
    values: dict[str, int] = {}
    if found is not None:
        values = {
            k: int(found["settings"][f"loader.{k}"]) for k in auto if f"loader.{k}" in found["settings"]
        }
        source = f"tune {found.get('run_id', '?')} ({found['time']})"
    missing = [k for k in auto if k not in values]
    if missing:
        partial = OmegaConf.merge(loader, values)
        by_rule, why = rule(machine, facts_.data(cfg, exp), partial)
        values.update({k: by_rule[k] for k in missing})
        source = f"rule: {why}" if found is None else f"{source}; rule for {', '.join(missing)}: {why}"
    resolved = OmegaConf.merge(loader, values)
    out = {f"loader.resolved.{k}": values[k] for k in auto}
    out["loader.resolved.from"] = source
    log.info("loader: %s (%s)", ", ".join(f"{k}=auto -> {values[k]}" for k in auto), source)
    return resolved, out
