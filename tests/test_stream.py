"""The readers under memmap and shards: random rows cold and warm, sequential buffers, drop-behind, damage."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time

import numpy as np
import pytest

from pipeline.data.integrity import IntegrityError
from pipeline.data.storage import stream
from pipeline.data.storage.stream import BufferStream, RecordFile, RowReader, npy_layout


def cached_fraction(path) -> float:
    """Share of ``path``'s pages in the page cache, from ``mincore(2)`` (libc, through ctypes: the mmap
    module offers no mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        vec = (ctypes.c_ubyte * pages)()
        try:
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / pages


def evict(path) -> None:
    """Drop ``path``'s (clean, unmapped) pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def npy_file(path, x: np.ndarray):
    np.save(path, x, allow_pickle=False)
    evict(path)  # written and synced: clean pages, out of the cache
    return npy_layout(path, len(x))[0]


@pytest.fixture
def rows_file(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, size=(300, 5000), dtype=np.uint8)  # rows span pages
    path = tmp_path / "rows.npy"
    return path, npy_file(path, x), x


def test_row_reader_reads_any_rows_cold_then_through_the_map_when_warm(rows_file):
    path, offset, x = rows_file
    reader = RowReader(path, offset, 5000, len(x), threads=4)
    rng = np.random.default_rng(1)
    cold = rng.integers(0, 300, size=64)  # unsorted, with repeats
    np.testing.assert_array_equal(reader.read(cold), x[cold])  # misses read by the pool
    assert not reader.mapped
    np.testing.assert_array_equal(reader.read(np.arange(300)), x)  # one read, partly cached: pool again
    assert not reader.mapped
    for _ in range(stream.MAPPED_AFTER):  # batches served wholly from the cache
        batch = np.sort(rng.choice(300, size=20, replace=False))
        np.testing.assert_array_equal(reader.read(batch), x[batch])
    assert reader.mapped == (stream.RWF_NOWAIT is not None)
    np.testing.assert_array_equal(reader.read(np.arange(300)), x)  # through the map
    np.testing.assert_array_equal(reader.read([7]), x[[7]])
    assert reader.read([]).shape == (0, 5000)
    with pytest.raises(IndexError):
        reader.read([300])


@pytest.mark.skipif(stream.RWF_NOWAIT is None, reason="no RWF_NOWAIT: the reader never maps")
def test_row_reader_leaves_the_map_when_the_cache_loses_the_file(tmp_path):
    x = np.arange(64 * 4096, dtype=np.uint8).reshape(64, 4096)
    path = tmp_path / "rows.npy"
    reader = RowReader(path, npy_file(path, x), 4096, 64)
    first = np.arange(32)
    reader.read(first)
    while not reader.mapped:  # rows 0-31 read with pread only: cached, never touched through the map
        np.testing.assert_array_equal(reader.read(first), x[first])
    evict(path)
    assert cached_fraction(path) < 0.5
    for k in range(stream.PROBE_EVERY):  # rows never read: through the map until a probe misses
        batch = np.arange(32 + 4 * k, 36 + 4 * k)
        np.testing.assert_array_equal(reader.read(batch), x[batch])
    assert not reader.mapped
    np.testing.assert_array_equal(reader.read(first), x[first])


def test_row_reader_names_a_truncated_file(rows_file):
    path, offset, x = rows_file
    reader = RowReader(path, offset, 5000, len(x))
    os.truncate(path, offset + 100 * 5000)
    with pytest.raises(IntegrityError, match=f"{path}.*truncated"):
        reader.read([5])
    with pytest.raises(IntegrityError, match=str(path)):
        npy_layout(path, len(x))
    path.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(IntegrityError, match=str(path)):
        npy_layout(path)


def _files(tmp_path, n_files=3, count=40, variable=False):
    """Shard-like files: fixed-size records in .npy files, or variable-size records with an offset index."""
    rng = np.random.default_rng(2)
    files, data = [], []
    for f in range(n_files):
        path = tmp_path / f"f{f}.{'bin' if variable else 'npy'}"
        if variable:
            recs = [
                rng.integers(0, 255, size=int(rng.integers(1, 30000)), dtype=np.uint8) for _ in range(count)
            ]
            offsets = np.zeros(count + 1, dtype=np.int64)
            np.cumsum([len(r) for r in recs], out=offsets[1:])
            path.write_bytes(b"HEAD" + b"".join(r.tobytes() for r in recs))
            evict(path)
            files.append(RecordFile(path, 4, count, offsets=offsets))
        else:
            recs = list(rng.integers(0, 255, size=(count, 3000), dtype=np.uint8))
            files.append(RecordFile(path, npy_file(path, np.stack(recs)), count, record_bytes=3000))
        data.append(recs)
    return files, data


@pytest.mark.parametrize("mode", BufferStream.MODES)
@pytest.mark.parametrize("variable", [False, True])
def test_buffer_stream_gives_every_requested_record(tmp_path, mode, variable):
    files, data = _files(tmp_path, variable=variable)
    rng = np.random.default_rng(3)
    requests = []
    for density in (1.0, 0.8, 0.1):  # read whole, read whole with gaps, read record by record
        fids = np.repeat(np.arange(3), 40)
        keep = rng.random(120) < density
        keep[0] = True
        order = rng.permutation(int(keep.sum()))
        requests.append((fids[keep][order], np.tile(np.arange(40), 3)[keep][order]))
    got = 0
    for (fids, recs), buf in zip(requests, BufferStream(files, mode=mode).load(requests)):
        idx = rng.permutation(len(recs))
        want = [data[f][r] for f, r in zip(fids[idx], recs[idx])]
        if variable:
            blob, offsets = buf.blobs(idx)
            assert [blob[a:b].tobytes() for a, b in zip(offsets[:-1], offsets[1:])] == [
                w.tobytes() for w in want
            ]
        else:
            np.testing.assert_array_equal(buf.rows(idx), np.stack(want))
        buf.release()
        got += 1
    assert got == len(requests)


def test_buffer_stream_holds_at_most_two_buffers(tmp_path):
    files, _ = _files(tmp_path)
    pulled = []

    def requests():
        for k in range(6):
            pulled.append(k)
            yield np.array([k % 3]), np.array([0])

    loads = BufferStream(files, mode="memory").load(requests())
    next(loads)
    time.sleep(0.3)  # the reader reads one buffer ahead, then waits for a release
    assert len(pulled) <= 3 and threading.active_count() >= 2
    assert len(list(loads)) == 5  # asking for the next buffer releases the one before


def test_memory_buffers_drop_pages_behind_mapped_ones_keep_them(tmp_path):
    files, data = _files(tmp_path, n_files=2, count=400)  # 1.2 MB per file
    whole = [(np.full(400, f), np.arange(400)) for f in range(2)]
    for f, buf in enumerate(BufferStream(files, mode="memory").load(whole)):
        np.testing.assert_array_equal(buf.rows(np.arange(400)), np.stack(data[f]))
        buf.release()
    assert max(cached_fraction(f.path) for f in files) < 0.1  # read, copied, dropped
    for buf in BufferStream(files, mode="mapped").load(whole):
        buf.rows(np.arange(400))
        buf.release()
    assert min(cached_fraction(f.path) for f in files) > 0.9  # read through the cache, left there


@pytest.mark.parametrize("mode", BufferStream.MODES)
def test_buffer_stream_names_a_file_truncated_after_it_was_checked(tmp_path, mode):
    files, _ = _files(tmp_path)
    os.truncate(files[1].path, files[1].offset + 10 * 3000)
    with pytest.raises(IntegrityError, match=f"{files[1].path}.*truncated"):
        for buf in BufferStream(files, mode=mode).load([(np.full(40, f), np.arange(40)) for f in range(3)]):
            buf.rows(np.arange(40))
            buf.release()


def test_memmap_read_ahead_asks_for_each_batch_before_it_is_read_and_only_for_its_rank():
    from pipeline.data.storage.batching import RandomBatchSampler
    from pipeline.data.storage.memmap import ReadAhead

    asked, events = [], []
    inner = RandomBatchSampler(100, 8, True, False, seed=1)
    sampler = ReadAhead(inner, lambda batch: (asked.append(batch), events.append(("ask", len(asked) - 1))))
    sampler.set_epoch(3)
    got = []
    for batch in sampler:
        got.append(batch)
        events.append(("read", len(got) - 1))
    inner.set_epoch(3)
    want = list(inner)
    assert len(got) == len(want) == len(sampler) and all((g == w).all() for g, w in zip(got, want))
    assert all((a == w).all() for a, w in zip(asked, want))  # every batch asked for, in order
    for k in range(len(want)):  # batch k was asked for AHEAD batches before it was read
        assert events.index(("ask", min(k + ReadAhead.AHEAD, len(want) - 1))) < events.index(("read", k))
    asked.clear()
    mine = list(sampler.for_rank(1, 3))
    assert len(asked) == len(mine) == len(sampler.for_rank(1, 3))  # a rank asks only for its own batches
    assert all((a == m).all() for a, m in zip(asked, mine))
