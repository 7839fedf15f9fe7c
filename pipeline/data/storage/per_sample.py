"""Shared layout of the one-file-per-sample formats (``pt``, ``npy``).

Sample ``i`` lives at ``samples/<i // 10000>/<i>.<ext>`` so that no folder holds more than 10,000
files however large the export. Subclasses only say how one array is saved and loaded.

Reading is guarded: a sample that cannot be decoded (truncated, corrupted, a pickle -- loaders never
unpickle) or that decodes to another shape or dtype than the manifest's raises ``SampleReadError``
naming the file. ``PerSampleFormat.check`` makes sure the export's file list holds one file per sample.
A batch (``read_into``) loads its samples' files one after the other into the batch's array.

In a parallel export each worker writes its parts' sample files itself (``SamplesPart``: a Writer of the
same class, in the worker, starting at the part's first id) and returns their digests.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from pipeline.data.integrity import IntegrityError, sample_error
from pipeline.data.storage.base import BatchedDataset, PartWriter, StorageFormat, Writer

FILES_PER_FOLDER = 10_000


def sample_relpath(sid: int, ext: str) -> str:
    return f"samples/{sid // FILES_PER_FOLDER:05d}/{sid:09d}.{ext}"


def sample_path(root: Path, sid: int, ext: str) -> Path:
    return root / sample_relpath(sid, ext)


def check_samples(root: Path, spec, files: dict[str, int], ext: str) -> None:
    """Raise IntegrityError unless the file list holds exactly one file per sample."""
    missing = [sid for sid in range(spec.num_samples) if sample_relpath(sid, ext) not in files]
    n_samples = sum(rel.startswith("samples/") for rel in files)
    if missing or n_samples != spec.num_samples:
        first = f"; first missing: {sample_relpath(missing[0], ext)}" if missing else ""
        raise IntegrityError(
            f"export {root} holds {n_samples} sample files for the manifest's {spec.num_samples} "
            f"samples{first}. Delete the folder to re-export"
        )


class SamplesPart(PartWriter):
    """A worker's side: a Writer of the same class writes the part's samples from its first id."""

    def __init__(self, cls: type, root: Path, spec) -> None:
        self.cls, self.root, self.spec = cls, root, spec

    def write(self, first: int, x: np.ndarray, y: np.ndarray, args) -> dict[str, str]:
        writer = self.cls(self.root, self.spec, None)
        writer.next_id = first
        writer.write(x, y)
        return writer.digests


class PerSampleWriter(Writer):
    """Writes each sample through memory so its sha256 is known without reading the file back."""

    ext = ""

    def __init__(self, root: Path, spec, cfg) -> None:
        self.root, self.spec, self.next_id = Path(root), spec, 0
        self.digests = {}  # relpath -> sha256, used by integrity.write_file_list
        self.folders: set[int] = set()  # sample folders made

    def part_writer(self) -> SamplesPart:
        return SamplesPart(type(self), self.root, self.spec)

    def commit(self, first: int, n: int, result: dict[str, str]) -> None:
        self.digests.update(result)

    def save(self, sample: np.ndarray, fh) -> None:
        """Serialise one sample into the binary file object ``fh``."""
        raise NotImplementedError

    def write(self, x: np.ndarray, y: np.ndarray) -> None:
        for sample in x:
            rel = sample_relpath(self.next_id, self.ext)
            path = self.root / rel
            if self.next_id // FILES_PER_FOLDER not in self.folders:
                path.parent.mkdir(parents=True, exist_ok=True)  # other workers may make it too
                self.folders.add(self.next_id // FILES_PER_FOLDER)
            buf = io.BytesIO()
            # a copy: saving a view of a larger array can store the whole array in every file
            self.save(np.array(sample, copy=True, order="C"), buf)
            data = buf.getbuffer()
            with open(path, "wb") as fh:
                fh.write(data)
            self.digests[rel] = hashlib.sha256(data).hexdigest()
            self.next_id += 1

    def close(self) -> None:
        pass


class PerSampleDataset(BatchedDataset):
    ext = ""
    per_sample_work = True  # a file opened and read per sample

    def __init__(self, root: Path, spec, labels: np.ndarray, ids: np.ndarray, cfg=None) -> None:
        super().__init__(spec, labels, ids)
        self.root = Path(root)
        self.want = (tuple(spec.shape), np.dtype(spec.dtype))  # what every sample must decode to

    def load(self, path: Path) -> np.ndarray:
        raise NotImplementedError

    def read_into(self, request, out: np.ndarray) -> None:
        for j, sid in enumerate(self.ids[request.positions].tolist()):
            path = sample_path(self.root, sid, self.ext)
            try:
                x = self.load(path)
            except Exception as err:  # truncated, corrupted, a pickle refused, missing, ...
                raise sample_error(sid, path, err, self.root) from err
            if (tuple(x.shape), x.dtype) != self.want:
                got = f"{tuple(x.shape)} {x.dtype}"
                raise sample_error(
                    sid, path, f"holds {got}, manifest says {self.spec.shape} {self.spec.dtype}", self.root
                )
            out[j] = x


class PerSampleFormat(StorageFormat):
    """A format of one file per sample: its module's ``Writer`` and ``Dataset`` classes, files ``ext``."""

    not_remote = "one file per sample would be one object, one GET, per sample and epoch"

    ext: str
    writer_class: type
    dataset_class: type

    def writer(self, root, spec, cfg):
        return self.writer_class(root, spec, cfg)

    def dataset(self, root, spec, labels, ids, cfg, files=None):
        return self.dataset_class(root, spec, labels, ids, cfg)

    def check(self, root, spec, files) -> None:
        """One file per sample in the export's file list."""
        check_samples(root, spec, files, self.ext)
