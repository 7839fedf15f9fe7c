"""A local cache of whole objects (shards), bounded in bytes, shared by the processes of one machine.

    from pipeline.data.remote.cache import ObjectCache
    cache = ObjectCache(store, "outputs/cache", limit_bytes=2 << 30)
    cache.prefetch([(key, size, sha256), ...])    # the next buffer's shards, downloaded in parallel
    path = cache.fetch(key, size, sha256)        # a verified local copy, pinned until released
    ... read path ...
    cache.release(key)                           # consumed: may now be evicted
    cache.stats()                                # remote bytes, hits, misses, seconds downloading

Layout under the cache folder: ``objects/`` the complete, verified objects; ``partial/`` downloads in
progress; ``pins/`` one lock file per (object, process) using it; ``locks/`` one lock per object;
``cache.lock`` the lock under which room is made; ``boot_id`` the boot the objects were written under
(objects are not fsync'ed: a cache last filled before a restart -- possibly a power cut -- starts empty).
An object's file name is a hash of its URL and the
first digits of its sha256 (so a replaced object never hits a stale copy) plus its base name.

Rules, and why they hold with several processes (DataLoader workers, torchrun ranks, the jobs of a sweep):

- Downloaded once: a process fetching an object holds that object's lock (``pipeline.fsio`` flock) while
  it looks for the file and downloads it; another process wanting it waits for the lock, then finds it.
- Never half-written: a download goes to ``partial/``, is checked against its sha256 (hashed as it
  arrives, one GET per object; objects download in parallel), then renamed into ``objects/``. A
  mismatch is fetched once more; a second mismatch raises ``CorruptObject`` naming the
  object. A process killed mid-download leaves a partial file whose object lock is free: the next scan
  removes it. The same for pins: flocks die with their process, so a dead reader never pins anything.
- Bounded: every byte on disk is counted -- complete objects and partial downloads, each partial file
  sized to its object's full length when the download is admitted (``ftruncate``), under ``cache.lock``.
  To admit a download the cache evicts objects nobody pins, least recently used (released) first, until it
  fits the limit. If what is pinned does not leave room, the download is still admitted when the cache
  holds no more than the limit: so the cache never holds more than ``limit + one object``, and progress
  never needs a second object over the limit. When the limit is below one object the cache holds exactly
  one at a time, and says so once in the log.
- Only what is being read is pinned: ``fetch`` pins (until ``release``); a prefetched object is an
  unpinned object until it is fetched, never able to hold room another process waits for. Its own process
  evicts it last (after every consumed object, whatever their age) and never to make room for another
  prefetch, which would only download it twice; a fetch that finds no other room still may.
- No deadlock: nobody holds an object's lock while waiting for room, so a process waiting for an object
  another process downloads waits only for that download. A fetch that finds no room waits for other
  processes to release what they pin, for at most ``wait_timeout_s`` (then CacheError naming the limit
  and what is pinned). A fetch blocked only by this process's own pins cannot be helped by waiting: it
  raises CacheError at once -- release consumed objects before fetching more, or raise the limit. With
  several processes sharing a cache, a limit of (processes x objects each pins at once + 1) objects never
  waits.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

from pipeline import fsio
from pipeline.data.remote.errors import CacheError, CorruptObject
from pipeline.data.remote.store import PART_SIZE, ObjectStore, sha256_file

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class CacheStats:
    """Counters of one process's cache use (``stats()``: cumulative; subtract two for an epoch's)."""

    remote_bytes: int = 0  # bytes downloaded (refetches included)
    hits: int = 0  # objects found in the cache (downloaded by anyone before)
    misses: int = 0  # objects this process downloaded
    refetches: int = 0  # downloads repeated because the bytes did not match their sha256
    download_seconds: float = 0.0  # wall time with at least one download running

    def __sub__(self, other: CacheStats) -> CacheStats:
        return CacheStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    @property
    def remote_mb(self) -> float:
        return self.remote_bytes / 1e6

    @property
    def remote_mb_per_s(self) -> float:
        return self.remote_mb / self.download_seconds if self.download_seconds > 0 else 0.0

    @property
    def hit_fraction(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


@dataclass
class _Pin:
    lock: fsio.Lock
    path: Path


@dataclass
class _View:
    """The cache folder as one scan under cache.lock saw it."""

    objects: dict  # name -> (size, mtime)
    pinned: dict  # name -> set of pids (as text)
    total: int  # bytes of objects and partial downloads
    others: int  # of which pinned or being downloaded by other processes
    own_partial: int  # of which being downloaded by this process


class ObjectCache:
    """Objects of ``store`` cached under ``folder``, at most ``limit_bytes`` (+ one object) on disk."""

    def __init__(
        self,
        store: ObjectStore,
        folder: str | Path,
        limit_bytes: int,
        *,
        threads: int = 4,
        part_size: int = PART_SIZE,
        download_threads: int = 1,
        wait_timeout_s: float = 600.0,
        poll_s: float = 0.05,
    ) -> None:
        if limit_bytes < 0:
            raise ValueError(f"limit_bytes={limit_bytes}: a cache limit is >= 0 bytes")
        self.store = store
        self.folder = Path(folder)
        self.limit = int(limit_bytes)
        self.threads, self.part_size, self.download_threads = threads, part_size, download_threads
        self.wait_timeout_s, self.poll_s = wait_timeout_s, poll_s
        for sub in ("objects", "partial", "pins", "locks"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self._boot_id = self._check_boot()
        self._said_small = False
        self._closed = False
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._mutex = threading.Lock()
        self._pins: dict[str, _Pin] = {}  # fetched and not yet released, by name
        self._names: dict[str, str] = {}  # key -> name, for release(key)
        self._inflight: set[str] = set()  # prefetches queued or running
        self._prefetched: set[str] = set()  # downloaded by a prefetch, not fetched yet (a miss when fetched)
        self._stats = CacheStats()
        self._active = 0
        self._active_since = 0.0
        self._pool: ThreadPoolExecutor | None = None

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # a forked child: the parent's pins and threads are not its own
            self._reset_process_state()

    def __getstate__(self) -> dict:
        keep = (
            "store",
            "folder",
            "limit",
            "threads",
            "part_size",
            "download_threads",
            "wait_timeout_s",
            "poll_s",
        )
        return {k: getattr(self, k) for k in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._said_small = False
        self._closed = False
        self._reset_process_state()

    def _check_boot(self) -> str:
        """Objects are not fsync'ed (that halves the download rate): while the machine is up, a renamed
        file's pages are in the page cache or on disk, whatever happens to processes. A power cut can lose
        them -- and reboots the machine: so a cache last used under another boot id starts empty."""
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return ""
        marker = self.folder / "boot_id"
        with fsio.locked(self.folder / "cache.lock"):
            try:
                seen = marker.read_text().strip()
            except FileNotFoundError:
                seen = ""
            if seen != boot:
                dropped = 0
                for sub in ("objects", "partial"):
                    for f in (self.folder / sub).iterdir():
                        f.unlink(missing_ok=True)
                        dropped += 1
                if dropped:
                    log.info(
                        "cache %s: the machine restarted since it was filled; %d files dropped",
                        self.folder,
                        dropped,
                    )
                fsio.atomic_write(marker, boot)
        return boot

    # --- public ---------------------------------------------------------------------------------------
    def name_of(self, key: str, sha256: str) -> str:
        """The file name of ``key`` (with content ``sha256``) in ``objects/``."""
        digest = hashlib.sha256(f"{self.store.bucket}/{key}".encode()).hexdigest()[:24]
        base = _SAFE.sub("_", key.rsplit("/", 1)[-1])[:80] or "object"
        return f"{digest}-{sha256[:12]}-{base}"

    def fetch(self, key: str, size: int, sha256: str) -> Path:
        """A verified local copy of ``key``, pinned (never evicted) until ``release(key)``."""
        self._check_pid()
        name = self.name_of(key, sha256)
        with self._mutex:
            self._names[key] = name
            pin = self._pins.get(name)
        if pin is not None:
            return pin.path
        path = self.folder / "objects" / name
        pin = self._pin(name, path)
        try:
            downloaded = self._obtain(name, key, size, sha256, path, foreground=True)
        except BaseException:
            self._unpin(pin)
            raise
        with self._mutex:
            twin = self._pins.get(name)  # another thread fetched it meanwhile: one pin is enough
            if twin is None:
                self._pins[name] = pin
            if downloaded or name in self._prefetched:
                self._stats.misses += 1
            else:
                self._stats.hits += 1
            self._prefetched.discard(name)
        if twin is not None:
            self._unpin(pin)
        return path

    def prefetch(self, items: Iterable[tuple[str, int, str]]) -> None:
        """Download ``(key, size, sha256)`` objects in the background, as room allows. Errors are logged
        (at debug level) and met again when the object is fetched."""
        self._check_pid()
        if self._closed:
            raise CacheError(f"the cache {self.folder} is closed")
        for key, size, sha256 in items:
            name = self.name_of(key, sha256)
            with self._mutex:
                self._names[key] = name
                if name in self._pins or name in self._inflight or name in self._prefetched:
                    continue
                self._inflight.add(name)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cache-prefetch")
            self._pool.submit(self._prefetch_one, name, key, size, sha256)

    def release(self, key: str) -> None:
        """``key`` is consumed: unpin it (it may be evicted; the least recently released go first)."""
        self._check_pid()
        with self._mutex:
            name = self._names.get(key)
            pin = self._pins.pop(name, None) if name else None
        if pin is None:
            return
        try:
            os.utime(pin.path)  # least recently released is evicted first
        except OSError:
            pass
        self._unpin(pin)

    def stats(self) -> CacheStats:
        with self._mutex:
            s = CacheStats(**{f.name: getattr(self._stats, f.name) for f in fields(CacheStats)})
            if self._active:
                s.download_seconds += time.monotonic() - self._active_since
        return s

    def cached_bytes(self) -> int:
        """Bytes in the cache folder now: complete objects plus admitted downloads (partial files). Taken
        under cache.lock, so an eviction and the admission it made room for are never both counted."""
        total = 0
        with fsio.locked(self.folder / "cache.lock"):
            for sub in ("objects", "partial"):  # objects first: a file renamed meanwhile counts once at most
                with os.scandir(self.folder / sub) as it:
                    for entry in it:
                        try:
                            total += entry.stat(follow_symlinks=False).st_size
                        except FileNotFoundError:
                            pass
        return total

    def close(self) -> None:
        """Stop prefetching and unpin everything this process holds."""
        self._closed = True
        if self._pid != os.getpid():
            return
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        with self._mutex:
            pins, self._pins = list(self._pins.values()), {}
        for pin in pins:
            self._unpin(pin)

    def __enter__(self) -> ObjectCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- obtaining ------------------------------------------------------------------------------------
    def _prefetch_one(self, name: str, key: str, size: int, sha256: str) -> None:
        try:
            self._obtain(name, key, size, sha256, self.folder / "objects" / name, foreground=False)
        except BaseException as err:  # noqa: BLE001 -- met again (and raised) when it is fetched
            log.debug("prefetch of %s failed: %s", self.store.url(key), err)
        finally:
            with self._mutex:
                self._inflight.discard(name)

    def _obtain(self, name: str, key: str, size: int, sha256: str, path: Path, foreground: bool) -> bool:
        """Make ``path`` the verified object; True if this call downloaded it. Holds the object's lock
        while it looks and downloads, never while it waits for room."""
        deadline = time.monotonic() + self.wait_timeout_s
        lock = self.folder / "locks" / f"{name}.lock"
        while True:
            with fsio.locked(lock):
                if self._present(path, size):
                    return False
                partial = self._try_reserve(name, size, foreground)
                if partial is not None:
                    self._download(key, size, sha256, partial, path)
                    if not foreground:  # before the lock is let go: a fetch waiting on it counts a miss
                        with self._mutex:
                            self._prefetched.add(name)
                    return True
            if self._closed:
                raise CacheError(f"the cache {self.folder} was closed while waiting for room")
            if time.monotonic() > deadline:
                with fsio.locked(self.folder / "cache.lock"):
                    view = self._scan()
                raise CacheError(
                    self._full_message(view, size, f"other processes (waited {self.wait_timeout_s:.0f} s)")
                )
            time.sleep(self.poll_s)

    @staticmethod
    def _present(path: Path, size: int) -> bool:
        try:
            if path.stat().st_size == size:
                os.utime(path)
                return True
        except FileNotFoundError:
            pass
        return False

    def _download(self, key: str, size: int, sha256: str, partial: Path, path: Path) -> None:
        url = self.store.url(key)
        try:
            for attempt in (1, 2):
                why = self._download_once(key, size, sha256, partial)
                if why is None:
                    break
                with self._mutex:
                    self._stats.refetches += 1
                if attempt == 1:
                    log.warning("%s: %s; fetching it again", url, why)
            else:
                raise CorruptObject(
                    f"{url} does not match its export's record: {why}, also when fetched a second time. The "
                    "object was damaged or replaced in the bucket: publish the export again (or restore it)"
                )
            with fsio.locked(
                self.folder / "cache.lock"
            ):  # a scan lists objects/ then partial/: never between
                os.rename(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def _download_once(self, key: str, size: int, sha256: str, partial: Path) -> str | None:
        """Download into ``partial`` (synced); None if its bytes match ``sha256``, else what differs."""
        self._busy(+1)
        try:
            with open(partial, "r+b") as fh:
                hasher = hashlib.sha256() if self.download_threads <= 1 else None  # hashed as it arrives
                try:
                    got = self.store.download_into(
                        fh.fileno(),
                        key,
                        size=size,
                        part_size=self.part_size,
                        threads=self.download_threads,
                        hasher=hasher,
                    )
                except CorruptObject as err:  # not the size recorded
                    return str(err).split(": ", 1)[-1]
                with self._mutex:
                    self._stats.remote_bytes += got
                digest = hasher.hexdigest() if hasher is not None else sha256_file(partial)
                if digest != sha256:
                    return (
                        f"sha256 {digest[:16]}... of its {size} bytes, the export recorded {sha256[:16]}..."
                    )
                if not self._boot_id:  # no boot id to tell a power cut by: make each object durable
                    os.fdatasync(fh.fileno())
                return None
        finally:
            self._busy(-1)

    def _busy(self, step: int) -> None:
        with self._mutex:
            now = time.monotonic()
            if step > 0 and self._active == 0:
                self._active_since = now
            self._active += step
            if step < 0 and self._active == 0:
                self._stats.download_seconds += now - self._active_since

    # --- pins -----------------------------------------------------------------------------------------
    def _pin(self, name: str, path: Path) -> _Pin:
        lock = fsio.Lock(self.folder / "pins" / f"{name}~{os.getpid()}~{threading.get_ident()}.pin")
        with fsio.locked(self.folder / "cache.lock"):  # a scan (which removes dead pins) sees it whole or not
            lock.acquire()
        return _Pin(lock=lock, path=path)

    def _unpin(self, pin: _Pin) -> None:
        with fsio.locked(self.folder / "cache.lock"):
            pin.lock.path.unlink(missing_ok=True)
            pin.lock.release()

    # --- room -----------------------------------------------------------------------------------------
    def _scan(self) -> _View:
        """The cache as it is (under cache.lock); removes the partial files and pins of dead processes."""
        me = str(os.getpid())
        pinned: dict[str, set[str]] = {}
        with os.scandir(self.folder / "pins") as it:
            for entry in it:
                name, pid, _tid = (entry.name.removesuffix(".pin").rsplit("~", 2) + ["", ""])[:3]
                if not fsio.is_locked(entry.path):
                    Path(entry.path).unlink(missing_ok=True)  # its process is gone
                    continue
                pinned.setdefault(name, set()).add(pid)
        objects = {}
        with os.scandir(self.folder / "objects") as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                objects[entry.name] = (st.st_size, st.st_mtime)
        partial = own = 0
        with os.scandir(self.folder / "partial") as it:
            for entry in it:
                name, pid, _tid = (entry.name.removesuffix(".part").rsplit("~", 2) + ["", ""])[:3]
                if not fsio.is_locked(self.folder / "locks" / f"{name}.lock"):
                    Path(entry.path).unlink(missing_ok=True)  # its downloader is gone
                    continue
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
                partial += size
                if pid == me:
                    own += size
        total = partial + sum(size for size, _ in objects.values())
        pinned_by_others = sum(objects[n][0] for n, pids in pinned.items() if n in objects and pids - {me})
        return _View(
            objects=objects,
            pinned=pinned,
            total=total,
            others=pinned_by_others + partial - own,
            own_partial=own,
        )

    def _evict(self, view: _View, need: int, foreground: bool = True) -> None:
        """Remove unpinned objects, least recently used first, until ``need`` more bytes fit the limit.
        Objects this process prefetched and has not fetched yet go last, and never to make room for another
        prefetch: evicted, they would be downloaded twice."""
        with self._mutex:
            ahead = set(self._prefetched)
        order = sorted(view.objects.items(), key=lambda kv: (kv[0] in ahead, kv[1][1]))
        for name, (size, _) in order:
            if view.total + need <= self.limit:
                return
            if name in view.pinned or (name in ahead and not foreground):
                continue
            lock = fsio.Lock(self.folder / "locks" / f"{name}.lock")
            if not lock.acquire():  # someone is looking at it right now
                continue
            try:
                (self.folder / "objects" / name).unlink(missing_ok=True)
            finally:
                lock.release()
            view.total -= size
            del view.objects[name]

    def _try_reserve(self, name: str, size: int, foreground: bool) -> Path | None:
        """Make room for ``size`` bytes and create the partial file holding it (sized, so it counts); None
        when there is no room now. CacheError when a fetch could only ever be helped by this process."""
        with fsio.locked(self.folder / "cache.lock"):
            view = self._scan()
            self._evict(view, size, foreground)
            if view.total + size <= self.limit or view.total <= self.limit:
                if size > self.limit and not self._said_small:
                    self._said_small = True
                    log.warning(
                        "cache limit %.1f MB is below one object (%.1f MB): the cache %s holds one object "
                        "at a time (raise storage.cache_limit_mb to prefetch)",
                        self.limit / 1e6,
                        size / 1e6,
                        self.folder,
                    )
                partial = self.folder / "partial" / f"{name}~{os.getpid()}~{threading.get_ident()}.part"
                with open(partial, "wb") as fh:
                    fh.truncate(size)
                return partial
        if foreground and view.others == 0 and view.own_partial == 0:
            raise CacheError(self._full_message(view, size, "this process's own fetched objects"))
        return None

    def _full_message(self, view: _View, size: int, who: str) -> str:
        return (
            f"the cache {self.folder} has no room for an object of {size / 1e6:.1f} MB: its limit is "
            f"{self.limit / 1e6:.1f} MB and {view.total / 1e6:.1f} MB are pinned or downloading, held by "
            f"{who}. "
            "Release consumed objects before fetching more, or raise the cache limit (storage.cache_limit_mb)"
        )
