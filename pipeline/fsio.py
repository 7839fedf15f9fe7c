"""File-system safety in one place: atomic writes, durable renames, inter-process locks.

    from pipeline import fsio
    fsio.atomic_write(path, b"...")            # temp file beside it, fsync, rename over, fsync the folder
    with fsio.atomic_file(path) as fh:         # the same for a writer that wants a file object
        torch.save(state, fh)
    fsio.fsync_dir(folder)                     # make a rename or a new entry in ``folder`` durable
    fsio.sync_tree(folder)                     # every file under ``folder`` on disk
    with fsio.locked(path, on_wait=log_fn):    # exclusive lock, held by this process while inside
        ...
    fsio.is_locked(path)                       # True while a live process holds it

A file written with ``atomic_write``/``atomic_file`` is either absent, the old version or the complete new
one -- never half-written, even after a SIGKILL or a power cut. The locks are ``flock`` locks: the kernel
drops them when the holding process dies, however it dies, so a held lock always means a live process.
(filelock 4 adds fork tracking and a soft-lock fallback whose semantics differ from this; the few lines
here are all the project needs.)
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator:
    """A file object writing to a temp file beside ``path``; on a clean exit it is synced and renamed
    over ``path`` (then the folder is synced); on an exception the temp file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically and durably (see ``atomic_file``)."""
    with atomic_file(path, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def _syncfs(fd: int) -> bool:
    """Linux ``syncfs(2)``: flush only the file system holding ``fd``. False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return False
    return fn(fd) == 0


def sync_tree(root: str | Path) -> None:
    """Every file under ``root`` on disk: ``syncfs`` of its file system where the platform has it
    (one call, whatever the file count, and other file systems on the host are left alone), else an
    ``fsync`` per file; then the folders."""
    root = Path(root)
    fd = os.open(root, os.O_RDONLY)
    try:
        if _syncfs(fd):
            return
    finally:
        os.close(fd)
    for folder, _dirs, files in os.walk(root):
        for name in files:
            ffd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(ffd)
            finally:
                os.close(ffd)
        fsync_dir(folder)


class Lock:
    """An exclusive ``flock`` on ``path`` (created if missing), held from ``acquire()`` to ``release()``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh = None

    def acquire(self, wait: bool = False) -> bool:
        """True once held. Without ``wait``: False at once if another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return False
        self._fh = fh
        return True

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


@contextmanager
def locked(path: str | Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock on ``path`` while inside. When another process holds it, ``on_wait()`` is called
    once, then this waits for it."""
    lock = Lock(path)
    if not lock.acquire():
        if on_wait is not None:
            on_wait()
        lock.acquire(wait=True)
    try:
        yield
    finally:
        lock.release()


def is_locked(path: str | Path) -> bool:
    """True while a live process holds the lock on ``path``."""
    if not Path(path).exists():
        return False
    probe = Lock(path)
    if not probe.acquire():
        return True
    probe.release()
    return False
