"""OmegaConf resolvers the configs use: ``${project_root:}`` and ``${run_stamp:}``.

pipeline.config.register()   # registers them (and the schemas)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = PACKAGE_DIR.parent / "conf"


def project_root() -> str:
    """Where ``outputs/`` lives: $PIPELINE_ROOT, else the source checkout, else the working directory."""
    if os.environ.get("PIPELINE_ROOT"):
        return str(Path(os.environ["PIPELINE_ROOT"]).resolve())
    checkout = PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").exists() and (checkout / "conf").is_dir():
        return str(checkout)
    return str(Path.cwd())


def run_stamp() -> str:
    """Hydra run-dir leaf that every rank of one torchrun launch computes alike: the time, or
    ``torchrun/<TORCHELASTIC_RUN_ID>`` under torchrun (``WORLD_SIZE`` > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if run_id == "none":  # torchrun without --standalone/--rdzv-id: the local agent's start time
            import psutil

            run_id = time.strftime(
                "%Y-%m-%d-%H-%M-%S", time.localtime(psutil.Process(os.getppid()).create_time())
            )
        return f"torchrun/{run_id}"
    return time.strftime("%Y-%m-%d/%H-%M-%S-") + f"{time.time_ns() // 1000 % 1_000_000:06d}"


def register() -> None:
    OmegaConf.register_new_resolver("project_root", project_root, replace=True)
    OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True, replace=True)
