"""Storage formats: how exported samples sit on disk and how a Dataset reads them back.

    from pipeline.data.storage import formats, get_format, register_format
    fmt = get_format("shards")                      # a StorageFormat (pipeline/data/storage/base.py)
    writer = fmt.writer(root, spec, cfg.storage)    # the export's side
    ds = fmt.dataset(root, spec, labels, ids, cfg.storage)   # the loader's side
    register_format(MyFormat())                     # a format from outside this package (a notebook, a test)

**Adding a format** = one module here that defines ``FORMAT`` (a ``StorageFormat``: its config dataclass,
writer and dataset; base.py holds the contracts and their defaults) + one YAML in conf/storage/ whose
defaults name ``base_<name>`` (the schema, registered with Hydra from ``FORMAT.config``). Every module of
this package is looked at once, on first use: those with a ``FORMAT`` are the formats. Nothing else lists
them. The formats here:

- ``pt``, ``npy``: one file per sample (per_sample.py), the classic recipe;
- ``memmap``: one contiguous ``.npy`` read by rows (pipeline/data/readers/rows.py);
- ``shards``, ``encoded``: samples placed in shard files, read in sequential buffers with a block shuffle
  (sharded.py; pipeline/data/readers/buffers.py); ``encoded`` stores each sample as a PNG/WebP/JPEG;
- ``ram``: one ``.npy`` loaded whole into memory (the approach that fails out of core).

Labels (``labels.npy``) and the manifest are written by the export stage for every format.
"""

from __future__ import annotations

from pipeline.data.registry import Registry
from pipeline.data.storage.base import StorageFormat

_FORMATS = Registry(__name__, "FORMAT", StorageFormat, "storage format")


def formats() -> dict[str, StorageFormat]:
    """Every known format by name: this package's, then the registered ones."""
    return _FORMATS.all()


def get_format(name: str) -> StorageFormat:
    return _FORMATS.get(name)


def register_format(fmt: StorageFormat, *, option: bool = True) -> None:
    """Make ``fmt`` known: the export, the loader and ``validate`` find it by name, and Hydra composes its
    schema as ``base_<name>`` (and, with ``option``, as the option ``storage=<name>`` itself, so a format
    defined in a notebook or a test needs no YAML)."""
    from pipeline.config.schema import register_storage_schema

    _FORMATS.add(fmt)
    register_storage_schema(fmt.name, fmt.config, option=option)
