"""Torch intra-op threads per job, so that jobs running side by side do not oversubscribe the cores.

    from pipeline.training.threads import apply_torch_threads
    n = apply_torch_threads(cfg.trainer.torch_threads)   # "auto" or an integer >= 1

``trainer.torch_threads``:
- an integer N: ``torch.set_num_threads(N)``.
- ``auto`` (default): when the job was started by a launcher that runs several jobs at once on this
  machine (``hydra/launcher=joblib``: ``hydra.launcher.n_jobs``), each job gets
  ``max(1, usable cores // n_jobs)`` threads; under a submitit launcher with
  ``hydra.launcher.cpus_per_task`` set, that many; in a SLURM job, ``$SLURM_CPUS_PER_TASK``;
  otherwise torch's own default is kept (all cores for a single job).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _launcher() -> dict:
    from hydra.core.hydra_config import HydraConfig

    return (HydraConfig.get().get("launcher") or {}) if HydraConfig.initialized() else {}


def launcher_cpus_per_task() -> int | None:
    """``hydra.launcher.cpus_per_task`` of a submitit launcher, when set."""
    launcher = _launcher()
    n = launcher.get("cpus_per_task") if "submitit" in str(launcher.get("_target_", "")).lower() else None
    return n if isinstance(n, int) and n > 0 else None


def parallel_jobs() -> int | None:
    """How many jobs the Hydra launcher runs at once on this machine, when it says so."""
    launcher = _launcher()
    if "joblib" not in str(launcher.get("_target_", "")).lower():
        return None
    n = launcher.get("n_jobs")
    if not isinstance(n, int) or n == 0:
        return None
    return n if n > 0 else max(1, usable_cores() + 1 + n)  # joblib: -1 = all cores, -2 = all but one


def auto_threads(cores: int, jobs: int | None, slurm_cpus: str | None, cpus_per_task: int | None = None):
    """Threads for one job, or None to keep torch's default."""
    if jobs:
        return max(1, cores // jobs)
    if cpus_per_task:
        return cpus_per_task
    if slurm_cpus and slurm_cpus.isdigit() and int(slurm_cpus) > 0:
        return int(slurm_cpus)
    return None


def apply_torch_threads(setting) -> int:
    """Set torch's intra-op threads from ``trainer.torch_threads``; return the number in effect."""
    if str(setting) == "auto":
        n = auto_threads(
            usable_cores(),
            parallel_jobs(),
            os.environ.get("SLURM_CPUS_PER_TASK"),
            launcher_cpus_per_task(),
        )
    else:
        n = int(setting)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
        log.info("torch intra-op threads: %d", n)
    return torch.get_num_threads()
