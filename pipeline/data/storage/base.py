"""The contracts of a storage format: what the export, the loader and the job call, with the defaults.

A format is a module in this package that defines ``FORMAT``, an instance of a ``StorageFormat`` subclass
(pipeline/data/storage/__init__.py finds it), plus one YAML in conf/storage/ naming its config schema:

    class Tiny(StorageFormat):
        name = "tiny"
        config = TinyConfig                      # a dataclass extending pipeline.config.schema.StorageConfig
        def writer(self, root, spec, cfg): return TinyWriter(root, spec, cfg)
        def dataset(self, root, spec, labels, ids, cfg, files=None): return TinyDataset(root, ...)
    FORMAT = Tiny()

Three contracts, each a base class whose optional hooks have defaults (nothing is probed by name):

- ``StorageFormat``: ``writer`` and ``dataset`` (required); ``layout`` (its files' version, in the export's
  fingerprint), ``read_options`` (config keys the files do not depend on: changing one reuses the export),
  ``identity(cfg)`` (what the files depend on beyond the config, e.g. a decoder's version), ``check(root,
  spec, files)`` (a structural check when an export is opened), ``check_fits(spec, n)`` (raise before
  loading when a format that holds its data in memory would not fit), ``validate(cfg)`` (its own options,
  and what it needs of the source, as ``ConfigError``s before any work).
- ``Writer``: ``write(x, y)`` for consecutive chunks, then ``close()``; ``after_sync()`` once every file is
  on disk; ``stored_bytes`` (a compressing format's bytes of all samples) and ``digests`` (files it hashed
  while writing) for the export's manifest. For a parallel export (pipeline/data/writing.py), the per-chunk
  work that can run in a worker process: ``part_writer()`` returns a ``PartWriter`` (picklable, no open
  files) whose ``write(first, x, y, args)`` runs in a worker on samples ``first .. first + len(x) - 1`` --
  encoding them, writing them to their places in files the Writer created, or to a part file of its own in
  the export's temp folder -- and returns something small; the exporting process passes that to
  ``commit(first, n, result)`` in sample order, then calls ``close()`` as after ``write``s. ``part_args(first,
  n)`` is what one part needs from the Writer (shards: the records its samples go to). The parts' files must
  be the same bytes for any split into parts and any number of workers. Default: no ``PartWriter``, the
  exporting process ``write``s every chunk (the workers still read and convert them). What finishes the
  files once every part is in can run on the workers too: ``finish_tasks()`` (default: none; ``close`` does
  it).
- ``BatchedDataset``: a map-style dataset over sample ids ``ids`` that reads whole batches:
  ``read_into(request, out)`` fills ``out`` (``len(request)`` samples of ``spec.shape`` / ``spec.dtype``)
  with the samples at ``request.positions`` (a batch or a part of one), ``release(request)`` once a batch is
  read (default: nothing); ``batch_sampler(...)`` gives the epoch's batches (an
  ``EpochBatchSampler``, pipeline/data/sampling.py; default: a uniform shuffle); ``share_with_workers(n)``
  allocates, before DataLoader workers start, what they share with the main process (default: nothing).
  ``__getitems__`` and ``__getitem__`` are built on ``read_into``.

Format modules import no torch at import time: the config layer imports them to register their schemas
when Hydra composes, and ``pipeline --cfg job`` answers without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from pipeline.data.sampling import BatchRequest, EpochBatchSampler, RandomBatchSampler, as_request

_READER = 0


def set_reader(index: int) -> None:
    """Which process reads batches from now on: 0 the main process, w + 1 loader worker w (the worker pool
    sets it). Shared buffers count their readers by it (pipeline/data/readers/buffers.py)."""
    global _READER
    _READER = int(index)


def reader_index() -> int:
    return _READER


class PartWriter:
    """The work of a ``Writer`` that a worker process does on a part of the samples (module docstring).
    Pickled to the workers: it holds paths and sizes, never open files (a worker opens its own)."""

    def write(self, first: int, x: np.ndarray, y: np.ndarray, args) -> object:
        """Write (or prepare) samples ``first .. first + len(x) - 1``; return what ``Writer.commit`` needs."""
        raise NotImplementedError


class Writer:
    """Writes consecutive chunks of samples; the export calls ``write`` per chunk, then ``close``."""

    stored_bytes: int | None = None  # bytes of all samples as stored, when not num_samples x sample_bytes
    digests: dict[str, str] | None = None  # relpath -> sha256 of files hashed while writing

    def write(self, x: np.ndarray, y: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def after_sync(self) -> None:
        """Called once every file is on disk (e.g. drop the written files from the page cache)."""

    def part_writer(self) -> PartWriter | None:
        """What a worker process runs per part of the samples; None (the default): ``write`` does it all."""
        return None

    def part_args(self, first: int, n: int) -> object:
        """What the part of samples ``first .. first + n - 1`` needs from this Writer (default: nothing)."""
        return None

    def commit(self, first: int, n: int, result) -> None:
        """The part of samples ``first .. first + n - 1`` is written; ``result``: its ``PartWriter.write``'s.
        Called in sample order."""

    def finish_tasks(self) -> list | None:
        """After the last ``commit``: independent tasks (picklable, each with a ``run()``) that finish the
        files, which the export runs on its workers (encoded: one per shard, assembled from the part files),
        then passes their results in order to ``finished`` before ``close``. None (the default): ``close``
        does all that is left."""
        return None

    def finished(self, results: list) -> None:
        """The ``finish_tasks`` ran; ``results``: what each ``run()`` returned, in order."""


def passthrough_collate(batch):
    """``__getitems__`` returns the batch already collated."""
    return batch


class BatchedDataset:
    """The Dataset of every format (module docstring). Subclasses call ``super().__init__(spec, labels,
    ids)`` and define ``read_into``."""

    collate_fn = staticmethod(passthrough_collate)
    # Reading a sample is work of its own that releases the GIL (decoding a record, opening a file), so
    # ``loader.decode_threads`` read parts of a batch side by side. False (a gather of fixed-size rows: about
    # 0.1 ms a batch): the threads would cost more than they share (0.35-0.6x, docs/parallel-loading.md), and
    # the batch is read in one piece unless a per-sample transform runs.
    per_sample_work: ClassVar[bool] = False

    def __init__(self, spec, labels: np.ndarray, ids: np.ndarray) -> None:
        self.spec = spec
        self.ids = np.asarray(ids, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)[self.ids]  # by position

    def __len__(self) -> int:
        return len(self.ids)

    def read_into(self, request: BatchRequest, out: np.ndarray) -> None:
        """Fill ``out[j]`` with the sample at ``request.positions[j]``. ``request`` may be a part of a
        sampler's batch (``request.part(a, b)``): decode threads read the parts of one batch side by side."""
        raise NotImplementedError

    def release(self, request: BatchRequest) -> None:
        """Called once a whole batch of the sampler's has been read (all its parts): what it held may be
        reused (shards' buffers). Default: nothing."""

    def batch_sampler(self, batch_size: int, shuffle: bool, drop_last: bool, seed: int) -> EpochBatchSampler:
        """The epoch's batches; the default is a uniform shuffle, each batch's positions sorted."""
        return RandomBatchSampler(len(self), batch_size, shuffle, drop_last, seed)

    def share_with_workers(self, num_workers: int) -> None:
        """Called in the main process before DataLoader workers start: allocate what they must share with
        it (shards' memory buffers). Default: nothing."""

    def empty(self, n: int) -> np.ndarray:
        return np.empty((n, *self.spec.shape), dtype=np.dtype(self.spec.dtype))

    def __getitems__(self, batch):
        """``(x, y)`` tensors of a batch: a ``BatchRequest`` or plain positions."""
        import torch

        request = as_request(batch)
        out = self.empty(len(request))
        try:
            self.read_into(request, out)
        finally:
            self.release(request)
        return torch.from_numpy(out), torch.from_numpy(self.labels[request.positions])

    def __getitem__(self, i: int):
        x, y = self.__getitems__(BatchRequest([int(i)]))
        return x[0], int(y[0])


class StorageFormat:
    """One storage format (module docstring): required ``name``, ``config``, ``writer`` and ``dataset``."""

    name: ClassVar[str]
    config: ClassVar[type]  # its schema: a dataclass extending pipeline.config.schema.StorageConfig
    layout: ClassVar[int | None] = None
    read_options: ClassVar[tuple[str, ...]] = ()
    # its data can stream from object storage (a dataset then reads its files through ``files``); the
    # reason it cannot, for ``paths.data_dir=s3://...``'s error message, otherwise
    remote: ClassVar[bool] = False
    not_remote: ClassVar[str] = "its files are read in place, not in sequential buffers"

    def writer(self, root: Path, spec, cfg) -> Writer:
        raise NotImplementedError

    def dataset(
        self, root: Path, spec, labels: np.ndarray, ids: np.ndarray, cfg, files=None
    ) -> BatchedDataset:
        """``files`` (pipeline/data/readers/files.py ``ExportFiles``): where the data files are read from, the
        local disk by default; formats with ``remote`` read through it."""
        raise NotImplementedError

    def identity(self, cfg) -> dict | None:
        """What the files depend on beyond the config (in the fingerprint and the manifest); None: nothing."""
        return None

    def check(self, root: Path, spec, files: dict[str, int]) -> None:
        """Raise IntegrityError when an opened export's files (relpath -> size) lack what this format
        needs."""

    def check_fits(self, spec, num_samples: int) -> None:
        """Raise before loading when ``num_samples`` samples held in memory would not fit."""

    def validate(self, cfg) -> None:
        """Raise ConfigError for a bad value of this format's options (``cfg.storage``) or a source it cannot
        store (``cfg.source``), before any work. The default checks what every format's ``storage.dtype``
        needs: ``uint8`` stores 8-bit codes, so the source must be 8-bit. An override calls it too."""
        if str(cfg.storage.get("dtype", "source")) != "uint8":
            return
        from pipeline.config.checks import ConfigError
        from pipeline.data.quantize import NotEightBit, divisor_for

        try:
            divisor_for(cfg.source)
        except NotEightBit as err:
            raise ConfigError(
                "storage.dtype",
                "uint8",
                f"{err}. 8-bit storage needs 8-bit values: source=lfw with source.color=true, "
                "image_folder, digits, or synthetic with source.dtype=uint8; or keep storage.dtype=source",
            ) from None
