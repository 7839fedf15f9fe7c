"""Labeled Faces in the Wild through scikit-learn's ``fetch_lfw_people``.

The full set is 13,233 grey images of 62x47 (resize=0.5) of 5,749 people. scikit-learn downloads it
into ``data_home/lfw_home`` on first use; without network, put the files there yourself (layout in the
error message below) and pass ``source.data_home``. scikit-learn decodes the whole set into memory at
once (154 MB at the defaults); the export then writes it out chunk by chunk.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.config.checks import at_least, number
from pipeline.config.schema import SourceConfig
from pipeline.data.sources.base import SampleSpec, SourceKind, chunked


@dataclass
class LFWConfig(SourceConfig):
    name: str = "lfw"
    data_home: Optional[str] = None  # scikit-learn's cache folder; default ~/scikit_learn_data
    min_faces_per_person: int = at_least(0, 0)
    resize: float = number(0.5, above=0.0, at_most=1.0, valid="must be in (0, 1]")
    color: bool = False
    funneled: bool = True
    download_if_missing: bool = True
    download_timeout_s: float = number(20.0, above=0.0, valid="> 0")  # per network attempt
    download_retries: int = at_least(0, 3)  # further attempts after a failed download (1 s apart)


class LFWUnavailable(RuntimeError):
    pass


def _layout_help(data_home: Path, funneled: bool) -> str:
    folder = "lfw_funneled" if funneled else "lfw"
    home = data_home / "lfw_home"
    return (
        f"To provide LFW offline, place under {home}/ the files pairsDevTrain.txt, pairsDevTest.txt "
        f"and pairs.txt and the folder {folder}/<First_Last>/<First_Last>_0001.jpg (250x250 RGB "
        f"JPEGs, one folder per person), then run with source.data_home={data_home}"
    )


def fetch(cfg):
    from sklearn.datasets import fetch_lfw_people, get_data_home

    data_home = Path(get_data_home(cfg.data_home))
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(cfg.download_timeout_s)  # an offline machine fails fast, not never
    try:
        return fetch_lfw_people(
            data_home=str(data_home),
            funneled=cfg.funneled,
            resize=cfg.resize,
            min_faces_per_person=cfg.min_faces_per_person,
            color=cfg.color,
            download_if_missing=cfg.download_if_missing,
            n_retries=cfg.download_retries,
        )
    except OSError as err:  # URLError, socket timeouts and "file is missing" are all OSErrors
        why = "could not be downloaded" if cfg.download_if_missing else "is not there"
        raise LFWUnavailable(
            f"LFW data is not in {data_home / 'lfw_home'} and {why} ({err}). "
            + _layout_help(data_home, cfg.funneled)
        ) from err
    finally:
        socket.setdefaulttimeout(old_timeout)


class LFWSource:
    def __init__(self, cfg) -> None:
        data = fetch(cfg)
        if len(data.target) == 0:
            raise LFWUnavailable(
                f"LFW has no person with at least source.min_faces_per_person="
                f"{cfg.min_faces_per_person} images; lower it"
            )
        self.x = np.ascontiguousarray(data.images, dtype=np.float32)
        self.y = data.target.astype(np.int64)
        self.spec = SampleSpec(
            num_samples=len(self.y),
            shape=tuple(self.x.shape[1:]),
            dtype="float32",
            num_classes=len(data.target_names),
            class_names=tuple(str(n) for n in data.target_names),
        )

    def chunks(self):
        return chunked(self.x, self.y)


class LFW(SourceKind):
    name = "lfw"
    config = LFWConfig

    def build(self, cfg) -> LFWSource:
        return LFWSource(cfg)

    def eight_bit(self, cfg) -> float | str:
        """8-bit storage (pipeline/data/quantize.py): colour faces are scikit-learn's ``uint8 / 255.0`` in
        float32; grey faces average three such values (1,177 distinct levels), which 8 bits cannot hold."""
        if cfg.color:
            return 255.0
        return (
            "with source.color=false scikit-learn averages the three colour channels' k/255 values in "
            "float32, giving 1,177 distinct grey levels that 8 bits cannot hold exactly; use "
            "source.color=true"
        )


SOURCE = LFW()
