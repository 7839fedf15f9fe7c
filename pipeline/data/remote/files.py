"""A published export's data files as the readers see them: brought into the bounded local cache while read.

    from pipeline.data.remote.files import RemoteFiles
    files = RemoteFiles(remote_export)                  # an ExportFiles (pipeline/data/readers/files.py)
    local = files.open(exp.root / "shards/shard-00003.npy")   # fetched (verified, pinned) into the cache
    ...                                                 # open a descriptor or map on ``local``
    files.close(exp.root / "shards/shard-00003.npy")    # unpinned: evictable; what was opened stays readable
    files.prefetch([...])                               # the next buffer's shards, downloaded in parallel

Paths are those the export would have in a local folder (``remote_export.root`` / relative path): the
formats build their paths as for a local export, and this maps each to its object. ``size`` comes from the
export's file list (each fetch checks the bytes against its sha256 anyway), ``head`` is one ranged GET
(a shard's ``.npy`` header, when a dataset is built). pipeline/data/storage/sharded.py reads through it.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.readers.files import ExportFiles
from pipeline.data.remote.publish import RemoteExport


class RemoteFiles(ExportFiles):
    remote = True

    def __init__(self, export: RemoteExport) -> None:
        self.export = export

    def _rel(self, path: Path) -> str:
        return Path(path).relative_to(self.export.root).as_posix()

    def open(self, path: Path) -> Path:
        return self.export.fetch(self._rel(path))

    def close(self, path: Path) -> None:
        self.export.release(self._rel(path))

    def prefetch(self, paths) -> None:
        self.export.prefetch([self._rel(p) for p in paths])

    def size(self, path: Path) -> int:
        return self.export.item(self._rel(path))[1]

    def stats(self):
        return self.export.cache.stats()  # a CacheStats: remote_mb, hit_fraction; subtract two for an epoch

    def head(self, path: Path, n: int) -> bytes:
        key, size, _ = self.export.item(self._rel(path))
        return self.export.cache.store.get_range(key, 0, min(n, size))
