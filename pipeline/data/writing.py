"""The export's write loop: a source's samples through a storage format's Writer, serially or on every core.

    from pipeline.data.writing import write_samples
    written = write_samples(engine, kind, source_cfg, source, spec, divisor, writer, tmp)
    written.labels, written.content_sha256, written.done

**Work.** A task is a run of consecutive samples ``first .. first + n - 1``: a ``Piece`` of the source that
the worker reads itself (``SourceKind.pieces`` / ``read_piece``: an image folder's files, a synthetic block),
or, for a source that does not split (lfw, digits: in memory after loading), a chunk of ``chunks()`` that
this process reads and ships. The worker converts it to the stored dtype (8-bit codes: pipeline/data/
quantize.py), checks its shape, digests it, and -- where the format has a ``PartWriter`` -- writes it
(encodes, ``pwrite``s, writes a part file) and returns only sizes and digests. This process takes the
results in sample order (``Engine.map``), ``commit``s each part to the Writer (or ``write``s the samples,
for a format without a PartWriter), and keeps the labels; what finishes the files once all parts are in runs
on the workers too where the format splits it (``Writer.finish_tasks``: encoded's shards, one task each).
With ``export.workers=1`` (engine ``serial``) the same steps run here, chunk by chunk, the Writer's
``write`` doing the format's work: the serial path.

**Same content, any number of workers.** The bytes of every file depend only on the samples and their ids,
never on which worker wrote them or how the samples were split: records go to places fixed by the sample id
(the seeded placement), part files are read back by id, per-sample files are named by id.
``content_sha256`` is a digest of the samples that does not depend on the split either: the SHA-256 of the
samples' own SHA-256 digests in id order, each over the sample's stored bytes followed by its label as a
little-endian int64 (``leaf_digests``). Workers digest their samples; this process chains the 32-byte
digests, so no sample travels back to it for hashing.

**Bounded memory.** At most ``workers x export.tasks_per_worker`` tasks are in flight, each at most a
chunk (an image folder's ``chunk_size``, a synthetic block), whatever the data's size; the labels (8 bytes
a sample) and the Writer's per-sample index are all that grows with it.

**Progress.** The loop counts samples as results arrive, from all workers together: the bar, or the log line
every ``progress.log_every_s`` with samples/s, MB/s and the ETA (pipeline/progress.py).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from pipeline import fsio, progress
from pipeline.data import quantize
from pipeline.data.integrity import ExportError
from pipeline.data.sources.base import Piece, SampleSpec, SourceKind

log = logging.getLogger(__name__)

LABEL_DTYPE = np.dtype("<i8")


@dataclass(frozen=True)
class Job:
    """What every task of one export shares (sent to each worker)."""

    kind: SourceKind
    source_cfg: Any  # plain and resolved: a worker has no Hydra context
    spec: SampleSpec
    divisor: float | None
    part: Any  # the format's PartWriter, or None


@dataclass(frozen=True)
class Task:
    first: int
    n: int
    piece: Piece | None = None
    data: tuple | None = None  # (x, y) read by the exporting process
    args: Any = None  # Writer.part_args


@dataclass
class Done:
    first: int
    n: int
    y: np.ndarray
    leaves: bytes  # n SHA-256 digests
    result: Any = None  # the PartWriter's
    x: np.ndarray | None = None  # the converted samples, when the exporting process writes them


@dataclass
class Written:
    labels: np.ndarray
    content_sha256: str
    done: int
    workers: int
    engine: str


def convert(x, y, spec: SampleSpec, divisor, first: int) -> np.ndarray:
    """A chunk as stored: checked against ``spec``, 8-bit codes when the export stores uint8."""
    x = np.asarray(x)
    if x.shape[1:] != tuple(spec.shape) or len(x) != len(y):
        raise ExportError(
            f"source chunk has shape {x.shape} with {len(y)} labels; expected samples of {spec.shape}"
        )
    if spec.dtype == "uint8":
        x = quantize.encode(x, divisor, first_id=first)  # refuses a value that would not round-trip
    return np.ascontiguousarray(x, dtype=spec.dtype)


def leaf_digests(x: np.ndarray, y) -> bytes:
    """Each sample's SHA-256 over its stored bytes and its label (little-endian int64), concatenated."""
    rows = x.reshape(len(x), -1).view(np.uint8)
    labels = np.asarray(y, dtype=LABEL_DTYPE)
    out = bytearray()
    for j in range(len(rows)):
        h = hashlib.sha256(rows[j])
        h.update(labels[j : j + 1].tobytes())
        out += h.digest()
    return bytes(out)


def run(job: Job, task: Task) -> Done:
    """One task, in a worker (or, serially, here): read, convert, digest, and write where the format can."""
    if task.piece is not None:
        x, y = job.kind.read_piece(job.source_cfg, task.piece)
        if len(y) != task.n:
            raise ExportError(
                f"source={job.kind.name}: a piece of {task.n} samples (from sample {task.first}) "
                f"read {len(y)}"
            )
    else:
        x, y = task.data
    x = convert(x, y, job.spec, job.divisor, task.first)
    y = np.asarray(y, dtype=np.int64)
    done = Done(task.first, len(y), y, leaf_digests(x, y))
    if job.part is not None:
        done.result = job.part.write(task.first, x, y, task.args)
    else:
        done.x = x
    return done


def _visible(path: str) -> bool:
    return os.path.isdir(path)


def write_samples(
    engine, kind: SourceKind, source_cfg, source, spec: SampleSpec, divisor, writer, tmp
) -> Written:
    """Every sample of ``source`` through ``writer`` (module docstring); the Writer is closed on return."""
    n = spec.num_samples
    plain = (
        OmegaConf.create(OmegaConf.to_container(source_cfg, resolve=True))
        if OmegaConf.is_config(source_cfg)
        else source_cfg
    )
    part = pieces = None
    chunks = None  # the source's chunks, when this process reads them
    if not engine.in_process:
        pieces = kind.pieces(plain, source, engine.workers)
        if pieces is not None and sum(p.n for p in pieces) != n:
            raise ExportError(f"source={kind.name} split into {sum(p.n for p in pieces)} samples, not {n}")
        if pieces is None:
            chunks, several = _peek(source.chunks())
        else:
            several = len(pieces) > 1
        part = writer.part_writer() if several else None
        why = None
        if not several:
            why = "the source is one piece"
        elif pieces is None and part is None:
            why = f"source={kind.name} is read here and its format writes here"
        if why:  # nothing a worker could do that this process does not
            log.info("export: %s: exporting serially", why)
            part = pieces = None
            engine = _serial()
    if engine.remote:
        blind = sorted(w for w, ok in engine.everywhere(_visible, str(tmp)).items() if not ok)
        if blind:
            raise ExportError(
                f"export workers {blind} cannot see the export's temp folder {tmp}: the workers must see "
                "paths.data_dir at the same path (a shared file system)"
            )

    def tasks():
        first = 0
        if pieces is not None:
            for piece in pieces:
                yield Task(
                    first, piece.n, piece=piece, args=writer.part_args(first, piece.n) if part else None
                )
                first += piece.n
            return
        for x, y in chunks if chunks is not None else source.chunks():
            if first + len(y) > n:
                raise ExportError(f"source yielded more than the {n} samples it declared")
            yield Task(first, len(y), data=(x, y), args=writer.part_args(first, len(y)) if part else None)
            first += len(y)

    log.info(
        "export: %d samples of %s %s, %s (%s)",
        n,
        spec.shape,
        spec.dtype,
        engine.describe(),
        "pieces read by the workers" if pieces is not None else "read here",
    )
    job = Job(kind, plain, spec, divisor, part)
    labels = np.empty(n, dtype=np.int64)
    content = hashlib.sha256()
    done = 0
    meter = progress.Meter("export", n, sample_bytes=spec.sample_bytes)
    results = engine.map(run, tasks(), job)
    for d in progress.track(results, total=n, desc="export", unit="sample", weight=_count, meter=meter):
        if d.first != done or done + d.n > n:
            raise ExportError(f"source yielded more than the {n} samples it declared")
        if part is not None:
            writer.commit(d.first, d.n, d.result)
        else:
            writer.write(d.x, d.y)
        labels[done : done + d.n] = d.y
        content.update(d.leaves)
        done += d.n
    finish = writer.finish_tasks() if part is not None else None
    if finish:  # e.g. encoded's shards, assembled from the part files
        t = time.perf_counter()
        writer.finished(list(engine.map(_finish, finish)))
        log.info("export: %d finishing tasks on the workers in %.2f s", len(finish), time.perf_counter() - t)
    if engine.remote:  # workers on other machines: their writes on disk before the manifest
        t = time.perf_counter()
        engine.everywhere(fsio.sync_tree, str(tmp))
        log.debug("export: workers synced in %.2f s", time.perf_counter() - t)
    writer.close()
    if done != n:
        raise ExportError(f"source yielded {done} samples, declared {n}")
    return Written(labels, content.hexdigest(), done, engine.workers, engine.name)


def _finish(shared, task):
    return task.run()


def _count(d: Done) -> int:
    return d.n


def _peek(chunks) -> tuple:
    """(the same chunks, whether there are more than one): at most two chunks read ahead."""
    chunks = iter(chunks)
    head = list(itertools.islice(chunks, 2))
    return itertools.chain(head, chunks), len(head) > 1


def _serial():
    from pipeline.data.engines import Engine

    return Engine()
