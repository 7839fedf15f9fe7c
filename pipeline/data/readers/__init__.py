"""How bytes come off the disk when the data may be larger than the page cache.

- ``files``: the ``.npy`` header (``npy_layout``), ``RecordFile`` (where records lie), exact ``pread``s.
- ``rows``: ``RowReader``, random rows of one file without readahead (``memmap``; direct reads of shards).
- ``buffers``: ``BufferStream``, sequential buffers of shard files read ahead of the consumer (``shards``,
  ``encoded``), held in a ``BufferPool`` (shared with loader workers when there are any) until every batch
  cut from them is read.

Why they look like this, and the figures: each module's docstring and docs/storage-formats.md.
"""
