"""Storage formats: how exported samples sit on disk and how a Dataset reads them back.

One format = one module here with a ``Writer`` and a ``Dataset``, plus one YAML in conf/storage/:

    Writer(root, spec, cfg)            .write(x, y) for consecutive chunks, then .close()
    Dataset(root, spec, labels, ids, cfg)
                                        a map-style torch Dataset over the sample ids ``ids``;
                                        item i is (tensor of spec.shape, int label of ids[i])
    check_fits(spec, num_samples)      optional: raise before loading when a format that holds its
                                        data in memory would not fit (pipeline/job.py calls it)
    READ_OPTIONS, LAYOUT               optional: config keys the files do not depend on (left out of the
                                        export's fingerprint); the format's own layout version (in it)
    Writer.after_sync()                optional: called by the export once every file is on disk
    Writer.stored_bytes                optional: the samples' bytes as stored, when not spec.sample_bytes
                                        each (encoded); the manifest records them per sample
    identity(storage_cfg)              optional: what the files depend on beyond the config (encoded: the
                                        decoder's version); in the fingerprint and the manifest

How memmap, shards and encoded read (cold and warm): pipeline/data/storage/stream.py, docs/storage-formats.md.

Labels (``labels.npy``) and the manifest are written by the export stage for every format.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FORMATS = {
    "pt": "pipeline.data.storage.pt",
    "npy": "pipeline.data.storage.npy",
    "memmap": "pipeline.data.storage.memmap",
    "shards": "pipeline.data.storage.shards",
    "encoded": "pipeline.data.storage.encoded",
    "ram": "pipeline.data.storage.ram",
}


def get_format(name: str) -> ModuleType:
    if name not in FORMATS:
        raise ValueError(f"Unknown storage format {name!r}; valid: {sorted(FORMATS)}")
    return importlib.import_module(FORMATS[name])
