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
from pipeline.data.readers import files as files_mod
from pipeline.data.readers import rows as rows_mod
from pipeline.data.readers.buffers import BufferStream, MappedBuffer, rows_at
from pipeline.data.readers.files import RecordFile, npy_layout
from pipeline.data.readers.rows import RowReader


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
    for _ in range(rows_mod.MAPPED_AFTER):  # batches served wholly from the cache
        batch = np.sort(rng.choice(300, size=20, replace=False))
        np.testing.assert_array_equal(reader.read(batch), x[batch])
    assert reader.mapped == (files_mod.RWF_NOWAIT is not None)
    np.testing.assert_array_equal(reader.read(np.arange(300)), x)  # through the map
    np.testing.assert_array_equal(reader.read([7]), x[[7]])
    assert reader.read([]).shape == (0, 5000)
    with pytest.raises(IndexError):
        reader.read([300])


@pytest.mark.skipif(files_mod.RWF_NOWAIT is None, reason="no RWF_NOWAIT: the reader never maps")
def test_row_reader_leaves_the_map_when_the_cache_loses_the_file(tmp_path):
    x = np.arange(128 * 4096, dtype=np.uint8).reshape(128, 4096)
    path = tmp_path / "rows.npy"
    reader = RowReader(path, npy_file(path, x), 4096, 128)
    first = np.arange(32)
    reader.read(first)
    while not reader.mapped:  # rows 0-31 read with pread only: cached, never touched through the map
        np.testing.assert_array_equal(reader.read(first), x[first])
    evict(path)
    assert cached_fraction(path) < 0.5
    # rows never read: through the map until a probe misses. Gaps of 4 rows between batches: a row (after
    # the .npy header) straddles two pages, so adjacent batches would fault in the page the probe checks.
    for k in range(rows_mod.PROBE_EVERY):
        batch = np.arange(32 + 8 * k, 36 + 8 * k)
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


def rows_of(stream: BufferStream, buf, idx) -> np.ndarray:
    """Fixed-size records ``idx`` of a loaded buffer, as a reader of either mode gets them."""
    if isinstance(buf, MappedBuffer):
        return stream.gather(buf.file_ids[idx], buf.records[idx])
    out = np.empty((len(idx), stream.record_bytes), dtype=np.uint8)
    rows_at(stream.pool.data[buf.slot], buf.loc[idx], stream.record_bytes, out)
    return out


def blobs_of(stream: BufferStream, buf, idx) -> list[bytes]:
    """Variable-size records ``idx`` of a loaded buffer."""
    if isinstance(buf, MappedBuffer):
        return [stream.mapped_record(f, r).tobytes() for f, r in zip(buf.file_ids[idx], buf.records[idx])]
    data = stream.pool.data[buf.slot]
    return [data[a : a + n].tobytes() for a, n in zip(buf.loc[idx], buf.size[idx])]


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
    stream = BufferStream(files, mode=mode)
    for (fids, recs), buf in zip(requests, stream.load(requests)):
        idx = rng.permutation(len(recs))
        want = [data[f][r] for f, r in zip(fids[idx], recs[idx])]
        if variable:
            assert blobs_of(stream, buf, idx) == [w.tobytes() for w in want]
        else:
            np.testing.assert_array_equal(rows_of(stream, buf, idx), np.stack(want))
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
    first = next(loads)
    time.sleep(0.3)  # the reader reads one buffer ahead, then waits for a free one
    assert len(pulled) <= 4 and threading.active_count() >= 2  # (one request is looked at ahead: prefetch)
    first.release()
    rest = []
    for buf in loads:
        rest.append(buf.slot)
        buf.release()
    assert len(rest) == 5 and set(rest) <= {0, 1}


def test_a_buffer_stays_until_every_batch_issued_from_it_is_done(tmp_path):
    """The consumer's release alone does not free a buffer while a batch still reads from it (in a worker,
    say): the reader waits for that batch's ``done``, then reuses the buffer."""
    files, data = _files(tmp_path)
    stream = BufferStream(files, mode="memory")
    loads = stream.load([(np.full(40, f % 3), np.arange(40)) for f in range(4)])
    first, second = next(loads), next(loads)
    stream.pool.issue(first.slot)  # a batch handed to a worker
    first.release()  # the consumer is done cutting batches from it (and still holds the second)
    time.sleep(0.3)
    assert not stream.pool.free(first.slot)  # the third buffer waits: it may not overwrite the batch
    np.testing.assert_array_equal(rows_of(stream, first, np.arange(40)), np.stack(data[0]))
    stream.pool.done(first.slot, 0)  # the batch has copied its records
    third = next(loads)
    assert third.slot == first.slot and second.slot != first.slot
    np.testing.assert_array_equal(rows_of(stream, third, np.arange(40)), np.stack(data[2]))
    loads.close()


def test_memory_buffers_drop_pages_behind_mapped_ones_keep_them(tmp_path):
    files, data = _files(tmp_path, n_files=2, count=400)  # 1.2 MB per file
    whole = [(np.full(400, f), np.arange(400)) for f in range(2)]
    stream = BufferStream(files, mode="memory")
    for f, buf in enumerate(stream.load(whole)):
        np.testing.assert_array_equal(rows_of(stream, buf, np.arange(400)), np.stack(data[f]))
        buf.release()
    assert max(cached_fraction(f.path) for f in files) < 0.1  # read, copied, dropped
    stream = BufferStream(files, mode="mapped")
    for buf in stream.load(whole):
        rows_of(stream, buf, np.arange(400))
        buf.release()
    assert min(cached_fraction(f.path) for f in files) > 0.9  # read through the cache, left there


@pytest.mark.parametrize("mode", BufferStream.MODES)
def test_buffer_stream_names_a_file_truncated_after_it_was_checked(tmp_path, mode):
    files, _ = _files(tmp_path)
    os.truncate(files[1].path, files[1].offset + 10 * 3000)
    with pytest.raises(IntegrityError, match=f"{files[1].path}.*truncated"):
        stream = BufferStream(files, mode=mode)
        for buf in stream.load([(np.full(40, f), np.arange(40)) for f in range(3)]):
            rows_of(stream, buf, np.arange(40))
            buf.release()


def test_memmap_read_ahead_asks_for_each_batch_before_it_is_read_and_only_for_its_rank():
    from pipeline.data.sampling import RandomBatchSampler, ReadAhead

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
    assert len(got) == len(want) == len(sampler)
    assert all((g.positions == w.positions).all() and g.epoch == w.epoch == 3 for g, w in zip(got, want))
    assert all((a == w.positions).all() for a, w in zip(asked, want))  # every batch asked for, in order
    for k in range(len(want)):  # batch k was asked for AHEAD batches before it was read
        assert events.index(("ask", min(k + ReadAhead.AHEAD, len(want) - 1))) < events.index(("read", k))
    asked.clear()
    mine = list(sampler.for_rank(1, 3))
    assert len(asked) == len(mine) == len(sampler.for_rank(1, 3))  # a rank asks only for its own batches
    assert all((a == m.positions).all() for a, m in zip(asked, mine))
