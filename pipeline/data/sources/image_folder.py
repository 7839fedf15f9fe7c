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
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np
from omegaconf import MISSING, OmegaConf

from pipeline.config.checks import ConfigError, at_least, constrained, int_list
from pipeline.config.schema import Choice, SourceConfig
from pipeline.data.sources.base import SampleSpec, SourceKind


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


class ImageFolderSource:
    def __init__(self, cfg) -> None:
        self.mode = cfg.mode
        self.size = (int(cfg.size[0]), int(cfg.size[1]))
        self.chunk_size = int(cfg.chunk_size)
        listing = _Listing(cfg)
        self.root = listing.root
        full = cfg.check == "full"
        self.entries: list[Entry] = []
        for entry in listing.entries:
            try:
                _check_file(entry.path, full)
            except Exception as err:  # Pillow raises many types for bad data
                listing.problem(entry.path, f"is not a readable image ({type(err).__name__}: {err})")
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
            x = np.empty((len(part), *self.spec.shape), dtype=np.uint8)
            for i, entry in enumerate(part):
                try:
                    x[i] = _open(entry.path, self.mode, self.size)
                except Exception as err:
                    raise ImageFolderError(
                        f"{entry.path} passed the listing check but cannot be decoded "
                        f"({type(err).__name__}: {err}); remove it, or use source.check=full so that "
                        "on_error=skip can leave such files out"
                    ) from err
            yield x, np.array([e.label for e in part], dtype=np.int64)


class ImageFolder(SourceKind):
    name = "image_folder"
    config = ImageFolderConfig
    defined_by_config = False

    def build(self, cfg) -> ImageFolderSource:
        return ImageFolderSource(cfg)

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
