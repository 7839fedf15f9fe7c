"""Lineage: what a run was made from, as MLflow tags.

    from pipeline.tracking.lineage import lineage_tags, config_sha256
    tags = lineage_tags(cfg)     # {"git.commit": ..., "version.torch": "2.13.0+cpu", "config.sha256": ...}

Tags set here on every job run (the job adds ``data.fingerprint``, ``data.content_sha256`` and
``split.digest`` once the data stages ran):

- ``git.commit``, ``git.dirty``: the checkout the ``pipeline`` package was imported from
  (``git.dirty=true``: uncommitted changes to tracked files; ``unknown`` outside a git checkout);
- ``version.python|torch|numpy|hydra|omegaconf|mlflow``, ``platform``, ``torch.num_threads``,
  ``torch.deterministic``;
- ``config.sha256``: SHA-256 of the resolved config as sorted JSON, without the keys that only say
  where a run writes or resumes from (``paths``, ``tracking``, ``trainer.resume``) -- two runs with the
  same hash were asked for the same computation;
- ``pipeline.output_dir``: the run's folder (its checkpoints, ``trainer.resume=<run id>`` reads it).
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import OmegaConf

CODE_DIR = Path(__file__).resolve().parent
LOCATION_KEYS = ("paths", "tracking")
PACKAGES = {"numpy": "numpy", "hydra": "hydra-core", "omegaconf": "omegaconf", "mlflow": "mlflow"}


def git_info(root: str | Path) -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown"}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def config_sha256(cfg) -> str:
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in LOCATION_KEYS:
        data.pop(key, None)
    data.get("trainer", {}).pop("resume", None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def versions() -> dict[str, str]:
    out = {"version.python": platform.python_version(), "version.torch": torch.__version__}
    out.update({f"version.{name}": _version(dist) for name, dist in PACKAGES.items()})
    return out


def lineage_tags(cfg) -> dict[str, str]:
    return {
        **git_info(CODE_DIR),
        **versions(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "torch.num_threads": str(torch.get_num_threads()),
        "torch.deterministic": str(bool(cfg.trainer.deterministic)).lower(),
        "config.sha256": config_sha256(cfg),
        "pipeline.output_dir": str(cfg.paths.output_dir),
    }
