"""Integrity of a published export: every file's size, mtime and sha256, recorded at export, checked on use.

    from pipeline.data.integrity import write_file_list, check_files
    info = write_file_list(tmp_dir)          # at export: after every data file, before the manifest
    manifest["files"] = info                 # {"count", "bytes", "list_sha256"}
    check_files(root, manifest)              # every run: cheap (stat only)
    check_files(root, manifest, verify=True) # also every file's sha256 (reads all the data)

The list lives in ``files.json`` beside the manifest: ``{"algorithm": "sha256", "files": {relpath:
[size, mtime_ns, sha256]}}``. It is format-agnostic: whatever files a storage writer creates are listed,
so a new format gets the checks without code. The cheap check (always on) finds a missing, added or
resized file and a file list that was edited; a file whose mtime changed is re-hashed (changed after
export -- or only touched); ``verify=True`` hashes every file. Every problem names the file.

A storage format can add its own structural check: a module-level ``check(root, spec, files)`` in
its storage module (``files``: relpath -> size) is called after the file list has been checked.
Readers raise ``SampleReadError`` (naming the file) when a sample cannot be decoded.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline import fsio
from pipeline.data.safe_paths import UnsafePath, safe_relpath

MANIFEST = "manifest.json"
FILE_LIST = "files.json"
_NOT_DATA = (MANIFEST, MANIFEST + ".part", FILE_LIST, FILE_LIST + ".part")
_SHOW = 5  # problems named in one message


class ExportError(RuntimeError):
    """An export that cannot be built (disk full, permissions, a bad source) or used (see IntegrityError)."""


class IntegrityError(ExportError):
    """Exported data that is missing, incomplete, changed or does not match its manifest."""


class SampleReadError(IntegrityError):
    """A sample file that cannot be decoded into the sample the manifest describes."""


def sample_error(sid: int, path: Path, err: BaseException | str, root: Path) -> SampleReadError:
    why = err if isinstance(err, str) else f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    return SampleReadError(
        f"cannot read sample {sid} from {path}: {why}. The export {root} is damaged or was changed "
        "after export; delete that folder to re-export (verify=true checks every file's digest)"
    )


def data_files(root: Path) -> dict[str, os.stat_result]:
    """relpath -> stat of every file under ``root`` except the manifest and the file list."""
    root = Path(root)
    out: dict[str, os.stat_result] = {}
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    continue
                if entry.is_symlink():  # exports hold plain files only; a link could lead anywhere
                    raise IntegrityError(f"export {root}: {entry.path} is a symlink; exports hold no links")
                rel = Path(entry.path).relative_to(root).as_posix()
                if rel not in _NOT_DATA:
                    out[rel] = entry.stat(follow_symlinks=False)
    return out


def file_sha256(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(bufsize)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    if len(paths) < 64:
        return [file_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=4) as pool:  # open/read/sha256 release the GIL
        return list(pool.map(file_sha256, paths, chunksize=64))


def write_file_list(root: Path, known: dict[str, str] | None = None) -> dict:
    """Digest every data file under ``root`` into ``files.json`` (synced); return the manifest's entry.

    ``known``: relpath -> sha256 a writer computed from the bytes it wrote (those files are not re-read).
    """
    root = Path(root)
    known = known or {}
    stats = data_files(root)
    names = sorted(stats)
    todo = [n for n in names if n not in known]
    digests = {**known, **dict(zip(todo, _hash_all([root / n for n in todo])))}
    files = {n: [stats[n].st_size, stats[n].st_mtime_ns, digests[n]] for n in names}
    blob = json.dumps({"algorithm": "sha256", "files": files}, separators=(",", ":")).encode()
    fsio.atomic_write(root / FILE_LIST, blob)
    return {
        "count": len(names),
        "bytes": sum(stats[n].st_size for n in names),
        "list": FILE_LIST,
        "list_sha256": hashlib.sha256(blob).hexdigest(),
    }


def _fail(root: Path, what: str, problems: list[str], hint: str) -> None:
    shown = "; ".join(problems[:_SHOW])
    more = f" (and {len(problems) - _SHOW} more)" if len(problems) > _SHOW else ""
    raise IntegrityError(f"export {root}: {what}: {shown}{more}. {hint}")


REEXPORT = "Delete the folder to re-export"


def load_file_list(root: Path, manifest: dict) -> dict[str, list]:
    """The export's file list, checked against the digest the manifest holds."""
    info = manifest.get("files") or {}
    if "list_sha256" not in info:
        raise IntegrityError(
            f"export {root}: the manifest has no file list digest (written by an older version?). {REEXPORT}"
        )
    path = root / FILE_LIST
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"export {root}: {path} is missing. {REEXPORT}") from None
    if hashlib.sha256(blob).hexdigest() != info["list_sha256"]:
        raise IntegrityError(f"export {root}: {path} was changed after export. {REEXPORT}")
    files = json.loads(blob)["files"]
    for rel in files:  # names come from a file on disk: never let them point outside the export
        try:
            safe_relpath(rel)
        except UnsafePath as err:
            raise IntegrityError(f"export {root}: {path} lists an unsafe path: {err}") from None
    if (len(files), sum(v[0] for v in files.values())) != (info["count"], info["bytes"]):
        raise IntegrityError(
            f"export {root}: {path} disagrees with the manifest's file count/bytes. {REEXPORT}"
        )
    return files


def check_files(root: Path, manifest: dict, verify: bool = False) -> dict[str, list]:
    """Raise IntegrityError naming every file that is missing, added, resized or (re-hashed) changed."""
    root = Path(root)
    files = load_file_list(root, manifest)
    on_disk = data_files(root)
    missing = sorted(set(files) - set(on_disk))
    if missing:
        _fail(root, f"{len(missing)} file(s) missing", missing, REEXPORT)
    added = sorted(set(on_disk) - set(files))
    if added:
        _fail(root, f"{len(added)} file(s) not written by the export", added, "Remove them or re-export")
    resized = [
        f"{rel} has {on_disk[rel].st_size} bytes, exported {size}"
        for rel, (size, _, _) in files.items()
        if on_disk[rel].st_size != size
    ]
    if resized:
        _fail(root, "file(s) truncated or changed after export", resized, REEXPORT)
    suspects = (
        sorted(files) if verify else sorted(r for r, v in files.items() if on_disk[r].st_mtime_ns != v[1])
    )
    digests = _hash_all([root / r for r in suspects])
    changed = [
        f"{r} (sha256 {d[:12]}..., exported {files[r][2][:12]}...)"
        for r, d in zip(suspects, digests)
        if d != files[r][2]
    ]
    if changed:
        _fail(
            root, f"{len(changed)} file(s) changed after export (content digest differs)", changed, REEXPORT
        )
    return files
