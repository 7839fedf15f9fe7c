"""pipeline.system: disk reads of the main process and exited workers, cache drops, disk bandwidth."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.system.disk import largest_file, sequential_read
from pipeline.system.iocount import disk_read_bytes
from pipeline.system.page_cache import can_drop_all, drop

SIZE = 16 << 20


def _fstype(path: Path) -> str:
    """The filesystem type of the mount holding ``path``."""
    best, fstype = "", ""
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            mount = left.split()[4]
            if str(path).startswith(mount) and len(mount) > len(best):
                best, fstype = mount, right.split()[0]
    return fstype


@pytest.fixture
def data_file(tmp_path) -> Path:
    if _fstype(tmp_path.resolve()) in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {_fstype(tmp_path)}: no block device whose reads could be counted")
    path = tmp_path / "data.bin"
    with open(path, "wb") as fh:
        fh.write(os.urandom(SIZE))
        fh.flush()
        os.fsync(fh.fileno())
    return path


def _read_all(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(1 << 20):
            pass


class FileChunks:
    """A map-style dataset: item i reads MiB i of the file (in whichever process asks)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __len__(self) -> int:
        return SIZE >> 20

    def __getitem__(self, i: int):
        import torch

        with open(self.path, "rb") as fh:
            fh.seek(i << 20)
            return torch.frombuffer(bytearray(fh.read(1 << 20)), dtype=torch.uint8).sum()


def test_reads_of_an_exited_worker_are_counted_once(data_file):
    import psutil
    import torch

    earlier = {c.pid for c in psutil.Process().children()}  # e.g. another test's loader not yet collected
    loader = torch.utils.data.DataLoader(
        FileChunks(data_file), batch_size=4, num_workers=1, multiprocessing_context="fork"
    )
    list(loader)  # a first pass brings in whatever code the worker needs; only the data is dropped
    drop(data_file, method="fadvise")
    before = disk_read_bytes()
    assert len(list(loader)) == 4  # the worker read the whole file, then exited at the end of the pass
    assert not {c.pid for c in psutil.Process().children()} - earlier, (
        "the worker should have exited and been reaped"
    )
    read = disk_read_bytes() - before
    assert SIZE * 0.9 <= read <= SIZE * 1.3, f"{read} bytes read for a {SIZE}-byte file"


def test_warm_reads_cost_no_disk_and_a_drop_makes_the_next_read_hit_it(data_file):
    _read_all(data_file)
    before = disk_read_bytes()
    _read_all(data_file)
    assert disk_read_bytes() - before < SIZE * 0.1  # in the page cache

    assert drop(data_file.parent, method="fadvise") == "fadvise"  # every file of the folder
    before = disk_read_bytes()
    _read_all(data_file)
    assert disk_read_bytes() - before >= SIZE * 0.9


@pytest.mark.slow  # drops the whole machine's page cache: slows everything else running
def test_drop_caches_where_writable(data_file):
    if not can_drop_all():
        pytest.skip("/proc/sys/vm/drop_caches is not writable here (needs root)")
    _read_all(data_file)
    assert drop(data_file) == "drop_caches"
    before = disk_read_bytes()
    _read_all(data_file)
    assert disk_read_bytes() - before >= SIZE * 0.9


def test_bad_drop_method_is_named(data_file):
    with pytest.raises(ValueError, match="method='now'.*fadvise"):
        drop(data_file, method="now")


def test_sequential_read_is_cold_and_bounded(data_file, tmp_path):
    (tmp_path / "small.bin").write_bytes(b"x" * 100)
    assert largest_file(tmp_path) == data_file
    _read_all(data_file)  # warm: sequential_read must drop the file's pages itself
    r = sequential_read(data_file)
    assert r.bytes == SIZE and r.seconds > 0 and r.mb_per_s > 0
    assert r.from_disk >= 0.9
    part = sequential_read(data_file, max_bytes=5 << 20, block=2 << 20)
    assert part.bytes == 5 << 20
