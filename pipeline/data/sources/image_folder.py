"""Your own images: a folder with one sub-folder per class, read with Pillow a chunk at a time.

    pipeline source=image_folder source.root=/data/pets source.size=[64,64] source.mode=RGB

    root/
      cat/ 001.png 002.jpg ...        class 0 (class = sub-folder name, sorted)
      dog/ a.jpeg nested/b.png ...    class 1 (files in nested folders count for their class)

Each image is converted to ``mode`` (``L``: grey, samples of [H, W]; ``RGB``: [H, W, 3]), turned
upright from its EXIF orientation and resized to ``size`` = [H, W]; samples are ``uint8`` (the models
scale them to [0, 1]). Only ``chunk_size`` decoded images are in memory at a time.

The sample count must be known before the export writes anything, so the files are listed and
checked first: ``check: full`` decodes every image once while listing (then decoded again for the
export), so an unreadable file is always found before writing and ``on_error: skip`` can leave it
out; ``check: header`` only opens each file's header (and verifies PNG checksums), which is much
faster on large folders, but an image whose header is fine and whose data is broken (say a
truncated JPEG) then fails the export even with ``on_error: skip``, naming the file. Each
unreadable file is named in the log; ``on_error: fail`` stops at the first one.

Nothing outside ``root`` is read: a symlink (class folder or file) whose target resolves outside
the root is treated like an unreadable file (skipped and named, or fatal); symlinked folders inside
a class folder are not followed. Hidden files and folders (``.name``) are ignored.

The export's fingerprint includes ``identity()``: a digest of the listed files' paths, sizes and
modification times, so adding, removing or editing an image gives a new export instead of reusing
a stale one.

With ``export.workers`` > 1 (pipeline/data/writing.py) both passes run in worker processes: the
check (``build_parallel``) over runs of files, whose problems come back to the exporting process,
which skips or fails on them in listing order exactly as the serial check does; and the export,
whose pieces are runs of at most ``chunk_size`` files (fewer when that gives each worker several)
that each worker decodes and resizes. A file that fails to decode there fails the export naming it,
whichever worker met it. Pieces carry absolute paths: workers on other machines need the folder at
the same path.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import List

import numpy as np
from omegaconf import MISSING, OmegaConf

from pipeline.config.checks import ConfigError, at_least, constrained, int_list
from pipeline.config.schema import Choice, SourceConfig
from pipeline.data.sources.base import Piece, SampleSpec, SourceKind


class ImageMode(Choice):
    L = "L"  # grey, samples of [H, W]
    RGB = "RGB"  # samples of [H, W, 3]


class OnError(Choice):
    skip = "skip"  # name the file in the log and leave it out
    fail = "fail"  # stop the export


class ImageCheck(Choice):
    full = "full"  # decode every file while listing
    header = "header"  # read headers only (faster; a broken body fails the export, naming the file)


@dataclass
class ImageFolderConfig(SourceConfig):
    name: str = "image_folder"
    root: str = MISSING  # one sub-folder per class
    mode: ImageMode = ImageMode.L
    size: List[int] = int_list([64, 64], length=2, valid="[H, W] >= 1")
    extensions: List[str] = constrained([".png", ".jpg", ".jpeg"], lambda v: len(v) >= 1, "e.g. [.png, .jpg]")
    on_error: OnError = OnError.skip  # what an unreadable file or a link leaving root does
    check: ImageCheck = ImageCheck.full
    chunk_size: int = at_least(1, 256)


log = logging.getLogger(__name__)


class ImageFolderError(RuntimeError):
    """The folder cannot be used, or a file is unreadable with ``on_error=fail``."""


@dataclass(frozen=True)
class Entry:
    path: Path  # as listed under the root (may be a symlink that resolves inside it)
    label: int


def _inside(path: Path, root: Path) -> bool:
    """Does ``path`` (symlinks and ``..`` resolved) stay inside the already-resolved ``root``?"""
    try:
        return path.resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError):  # dangling link, symlink loop
        return False


class _Listing:
    """Class folders and candidate files under the root; problems collected as (path, why)."""

    def __init__(self, cfg, quiet: bool = False) -> None:
        self.quiet = quiet
        self.root = Path(cfg.root).expanduser()
        if not self.root.is_dir():
            raise ImageFolderError(
                f"source.root={cfg.root!r} is not a folder; it must hold one sub-folder of images per class"
            )
        self.real_root = self.root.resolve()
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in cfg.extensions)
        self.on_error = cfg.on_error
        self.problems: list[tuple[Path, str]] = []
        self.class_names = []
        for folder in sorted(self.root.iterdir()):
            if not folder.name.startswith(".") and folder.is_dir():
                if _inside(folder, self.real_root):
                    self.class_names.append(folder.name)
                else:
                    self.problem(folder, "is a link to a folder outside source.root")
        self.entries: list[Entry] = []
        for label, name in enumerate(self.class_names):
            for path in self._files(self.root / name):
                self.entries.append(Entry(path, label))
        if not self.class_names:
            raise ImageFolderError(
                f"source.root={cfg.root!r} has no class sub-folders; expected root/<class>/<image>"
            )

    def problem(self, path: Path, why: str) -> None:
        if self.on_error == "fail":
            raise ImageFolderError(f"{path} {why} (source.on_error=fail; use skip to leave such files out)")
        if not self.quiet:
            log.warning("image_folder: skipping %s: %s", path, why)
        self.problems.append((path, why))

    def _files(self, folder: Path):
        for dirpath, dirnames, filenames in os.walk(folder):  # does not descend into symlinked folders
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            here = Path(dirpath)
            for d in dirnames:
                if (here / d).is_symlink():
                    log.info("image_folder: not following the folder link %s", here / d)
            for name in sorted(filenames):
                path = here / name
                if name.startswith(".") or not name.lower().endswith(self.extensions):
                    continue
                if not _inside(path, self.real_root):
                    self.problem(path, "is a link that does not resolve to a file inside source.root")
                    continue
                yield path


def _open(path: Path, mode: str, size_hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert(mode)
        img = img.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def _check_file(path: Path, full: bool) -> None:
    """Raise if Pillow cannot read ``path``: its header (and PNG checksums), or with ``full`` the pixels."""
    from PIL import Image

    with Image.open(path) as img:
        if full:
            img.load()
            return
        img.verify()


def check_files(full: bool, paths: tuple[str, ...]) -> list[tuple[int, str]]:
    """(index, why) of each file of ``paths`` that Pillow cannot read (in a worker process, or not)."""
    bad = []
    for j, path in enumerate(paths):
        try:
            _check_file(Path(path), full)
        except Exception as err:  # Pillow raises many types for bad data
            bad.append((j, f"{type(err).__name__}: {err}"))
    return bad


def read_files(paths, labels, mode: str, size_hw: tuple[int, int], shape) -> tuple[np.ndarray, np.ndarray]:
    """The samples of ``paths`` (decoded, upright, resized) and their labels; a file that cannot be decoded
    raises ImageFolderError naming it."""
    x = np.empty((len(paths), *shape), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            x[i] = _open(Path(path), mode, size_hw)
        except Exception as err:
            raise ImageFolderError(
                f"{path} passed the listing check but cannot be decoded "
                f"({type(err).__name__}: {err}); remove it, or use source.check=full so that "
                "on_error=skip can leave such files out"
            ) from err
    return x, np.asarray(labels, dtype=np.int64)


def runs(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) runs of at most ``size`` items covering ``range(n)``."""
    return [(a, min(a + size, n)) for a in range(0, n, max(1, size))]


def piece_size(n: int, chunk_size: int, workers: int) -> int:
    """Files per piece: at most ``chunk_size``, and few enough that each worker gets about four pieces (so a
    slow piece does not leave the others idle at the end)."""
    return max(1, min(chunk_size, math.ceil(n / (4 * max(1, workers)))))


class ImageFolderSource:
    def __init__(self, cfg, pmap=map, workers: int = 1) -> None:
        self.mode = str(cfg.mode)
        self.size = (int(cfg.size[0]), int(cfg.size[1]))
        self.chunk_size = int(cfg.chunk_size)
        listing = _Listing(cfg)
        self.root = listing.root
        full = cfg.check == "full"
        paths = [os.path.abspath(e.path) for e in listing.entries]
        spans = runs(len(paths), piece_size(len(paths), self.chunk_size, workers))
        bad: dict[int, str] = {}
        found = pmap(partial(check_files, full), [tuple(paths[a:b]) for a, b in spans])
        for (a, _), problems in zip(spans, found):
            bad.update((a + j, why) for j, why in problems)
        self.entries: list[Entry] = []
        for i, entry in enumerate(listing.entries):  # skipped or fatal in listing order, as the serial check
            if i in bad:
                listing.problem(entry.path, f"is not a readable image ({bad[i]})")
                continue
            self.entries.append(entry)
        self.skipped = listing.problems
        if not self.entries:
            raise ImageFolderError(
                f"source.root={cfg.root!r}: no readable images with extensions {list(cfg.extensions)} "
                f"in its class folders {listing.class_names}"
            )
        if self.skipped:
            log.warning("image_folder: %d file(s) skipped (named above)", len(self.skipped))
        shape = self.size if self.mode == "L" else (*self.size, 3)
        self.spec = SampleSpec(
            num_samples=len(self.entries),
            shape=tuple(shape),
            dtype="uint8",
            num_classes=len(listing.class_names),
            class_names=tuple(listing.class_names),
        )

    def chunks(self):
        for start in range(0, len(self.entries), self.chunk_size):
            part = self.entries[start : start + self.chunk_size]
            yield read_files(
                [e.path for e in part], [e.label for e in part], self.mode, self.size, self.spec.shape
            )

    def pieces(self, workers: int) -> list[Piece]:
        """Runs of files (absolute paths) and their labels: ``piece_size`` files each."""
        n = len(self.entries)
        return [
            Piece(
                b - a,
                (
                    tuple(os.path.abspath(e.path) for e in self.entries[a:b]),
                    tuple(e.label for e in self.entries[a:b]),
                ),
            )
            for a, b in runs(n, piece_size(n, self.chunk_size, workers))
        ]


class ImageFolder(SourceKind):
    name = "image_folder"
    config = ImageFolderConfig
    defined_by_config = False

    def build(self, cfg) -> ImageFolderSource:
        return ImageFolderSource(cfg)

    def build_parallel(self, cfg, pmap, workers: int) -> ImageFolderSource:
        """The listing's check of every file in runs over ``pmap`` (the worker processes)."""
        return ImageFolderSource(cfg, pmap, workers)

    def pieces(self, cfg, source: ImageFolderSource, workers: int) -> list[Piece]:
        return source.pieces(workers)

    def read_piece(self, cfg, piece: Piece) -> tuple[np.ndarray, np.ndarray]:
        paths, labels = piece.ref
        return read_files(paths, labels, str(cfg.mode), (int(cfg.size[0]), int(cfg.size[1])), self.shape(cfg))

    def shape(self, cfg) -> tuple[int, ...]:
        return (int(cfg.size[0]), int(cfg.size[1])) + (() if str(cfg.mode) == "L" else (3,))

    def identity(self, cfg) -> dict:
        """What defines the data besides the config: the listed files, their sizes and mtimes."""
        listing = _Listing(cfg, quiet=True)
        digest = hashlib.sha256()
        for entry in listing.entries:
            st = entry.path.stat()
            rel = entry.path.relative_to(listing.root).as_posix()
            digest.update(f"{rel}\0{entry.label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"files": len(listing.entries), "sha256": digest.hexdigest()}

    def eight_bit(self, cfg) -> float:
        """Samples are uint8 already; the models read them as k / 255 (pipeline/data/quantize.py)."""
        return 255.0

    def validate(self, cfg) -> None:
        if OmegaConf.is_missing(cfg.source, "root"):
            raise ConfigError("source.root", "???", "set it to a folder of class folders")
        if not Path(cfg.source.root).expanduser().is_dir():
            raise ConfigError("source.root", cfg.source.root, "must be an existing folder")


SOURCE = ImageFolder()
