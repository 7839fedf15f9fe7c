"""The last tune for a machine, an export and a job's shape: a small JSON file that ``auto`` settings read.

    from pipeline.tune import record
    path = record.write(outputs, machine, export_fp, shape_of(cfg), settings, run_id=..., note=...)
    rec = record.read(outputs, machine.fingerprint(), export_fp, shape_of(cfg))   # dict or None

``<paths.outputs>/tune/records/<machine>-<export>-<shape>.json``: ``machine`` is the kind of machine
(pipeline/tune/facts.py ``Machine.fingerprint``: CPU, cores, CPU quota, memory, device), ``export`` the
export's fingerprint (the data and how it is stored), ``shape`` a digest of what else decides the answer --
batch size, model, transform, device setting. Written atomically (pipeline/fsio.py): a record is complete
or absent; a newer tune replaces it. A record that cannot be read is ignored with a warning (the rule
decides instead), never trusted half-read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from omegaconf import OmegaConf

from pipeline import fsio

log = logging.getLogger(__name__)

FOLDER = ("tune", "records")  # under paths.outputs
VERSION = 1


def shape_of(cfg) -> dict:
    """What besides the machine and the data the best loader settings depend on."""
    return {
        "batch_size": int(cfg.loader.batch_size),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "transform": OmegaConf.to_container(cfg.transform, resolve=True),
        "device": str(cfg.trainer.device),
    }


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def path_for(outputs: str | Path, machine_fp: str, export_fp: str, shape: dict) -> Path:
    return Path(outputs).joinpath(*FOLDER) / f"{machine_fp}-{export_fp}-{_digest(shape)}.json"


def write(outputs: str | Path, machine, export_fp: str, shape: dict, settings: dict, **extra) -> Path:
    """Record ``settings`` ({"loader.num_workers": 2, ...}) as the tune of this machine, export and shape."""
    path = path_for(outputs, machine.fingerprint(), export_fp, shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "version": VERSION,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"fingerprint": machine.fingerprint(), "cpu": machine.cpu, "cores": machine.cores},
        "export": export_fp,
        "shape": shape,
        "settings": settings,
        **extra,
    }
    return fsio.atomic_write(path, json.dumps(body, indent=2, default=str) + "\n")


def read(outputs: str | Path, machine_fp: str, export_fp: str, shape: dict) -> dict | None:
    path = path_for(outputs, machine_fp, export_fp, shape)
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("tune record %s cannot be read (%s): ignored", path, err)
        return None
    if (
        not isinstance(body, dict)
        or body.get("version") != VERSION
        or not isinstance(body.get("settings"), dict)
    ):
        log.warning("tune record %s is not a version-%d record: ignored", path, VERSION)
        return None
    body["path"] = str(path)
    return body
