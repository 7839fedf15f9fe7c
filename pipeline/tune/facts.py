"""What the tuner knows before it tries anything: the machine and the data, read or measured in seconds.

    from pipeline.tune import facts
    m = facts.machine()               # cores, CPU quota, memory limit and room, device: read, not timed
    d = facts.data(cfg, exp, split)   # export size, bytes a sample, decoded? augmented? fits the cache?
    f = facts.Facts(m, d)
    f.disk = facts.disk(exp)          # sequential MB/s and random reads/s of the export's largest file
    f.load_ms, f.step_ms = ...        # pipeline/tune/trials.py: the serial loader, the training step
    f.rows()                          # (name, value, what it means) for the report

Everything here comes from the modules that measure the machine for the job itself (pipeline/system:
cgroups, headroom, disk, iocount; pipeline/training/threads.py), so the tuner's picture is the job's. The rule
behind ``loader.num_workers=auto`` (pipeline/tune/auto.py) reads only ``Machine`` and ``Data``: what a job
knows without timing anything. The tuner adds what only measuring tells: the disk's speeds, how long the
serial loader takes a batch (reading, decoding, augmenting) and how long the training step takes one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.system.cgroups import cpu_limit, memory_limit
from pipeline.system.headroom import memory_room

MB = 1e6
MiB = 2**20
AUGMENTS = ("flip", "crop_padding", "resized_crop")  # per-sample work of a transform (pipeline/training)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def job_cores(cores: int, quota: float | None) -> int:
    """Cores one job may keep busy: the affinity mask, the CPU quota (rounded down, at least 1), divided
    among the jobs a Hydra launcher runs side by side (pipeline/training/threads.py) and torchrun's local
    ranks."""
    from pipeline.training.threads import parallel_jobs

    n = min(cores, max(1, int(quota))) if quota is not None else cores
    jobs = parallel_jobs() or 1
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, n // max(1, jobs * ranks))


@dataclass
class Machine:
    cpu: str
    cores: int  # usable by this process (affinity)
    cpu_quota: float | None  # CPUs the cgroup's quota allows; None: none
    job_cores: int  # what one job may keep busy (job_cores)
    ram_mb: float
    memory_limit_mb: float | None  # the cgroup's; None: none
    memory_room_mb: float  # RAM, or the cgroup's limit where lower: what the page cache can hold at most
    device: str

    def fingerprint(self) -> str:
        """The kind of machine a tune holds for: CPU, cores, quota, memory room (GiB), device. Not the host
        name: a container's changes, and two identical nodes should share a tune."""
        key = {
            "cpu": self.cpu,
            "cores": self.cores,
            "cpu_quota": self.cpu_quota,
            "memory_gib": round(self.memory_room_mb / 1024),
            "device": self.device,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def machine(device: str = "cpu") -> Machine:
    import psutil

    from pipeline.training.threads import usable_cores

    cores, quota, limit = usable_cores(), cpu_limit(), memory_limit()
    return Machine(
        cpu=cpu_model(),
        cores=cores,
        cpu_quota=quota,
        job_cores=job_cores(cores, quota),
        ram_mb=psutil.virtual_memory().total / MiB,
        memory_limit_mb=limit / MiB if limit is not None else None,
        memory_room_mb=memory_room() / MiB,
        device=device,
    )


@dataclass
class Data:
    storage: str
    fingerprint: str  # the export's
    export_mb: float  # its files, 10^6 bytes
    num_train: int
    sample_bytes: int  # a sample as the model gets it (decoded)
    stored_sample_bytes: float  # as stored (encoded: the mean record)
    decoded: bool  # the reader decodes each sample (its record is smaller than the sample)
    augmented: bool  # the train transform works on each sample (flip, crop, resized crop)
    fits_cache: bool  # the export is at most half the memory room: it stays cached from epoch to epoch

    @property
    def per_sample_work(self) -> bool:
        """Work on each sample beyond a copy: what spreads over decode threads and workers."""
        return self.decoded or self.augmented


def export_bytes(exp) -> int:
    return int(exp.manifest["files"]["bytes"])


def data(cfg, exp, split=None) -> Data:
    """What a job knows of its data once exported, without timing anything (``split``: for the train
    count; without it, the ratio's share)."""
    t = cfg.transform
    augmented = any(bool(t.get(k)) for k in AUGMENTS)
    size = export_bytes(exp)
    return Data(
        storage=str(exp.manifest["storage"]["name"]),
        fingerprint=exp.fingerprint,
        export_mb=size / MB,
        num_train=len(split.train) if split is not None else int(len(exp.labels) * cfg.split.ratio),
        sample_bytes=int(exp.spec.sample_bytes),
        stored_sample_bytes=exp.stored_sample_bytes,
        decoded=exp.stored_sample_bytes < 0.9 * exp.spec.sample_bytes,
        augmented=augmented,
        fits_cache=size <= memory_room() // 2,  # the threshold of shards' buffers=auto (sharded.py)
    )


@dataclass
class Disk:
    file: str
    sequential_mb_per_s: float
    from_disk: float  # share of the sequential read the device served (below ~0.9: partly cached)
    random_reads_per_s: float  # reads of one stored sample at random places, one at a time
    random_read_bytes: int
    random_from_disk: float = 1.0  # share of those bytes the device served


def random_reads(path: Path, read_bytes: int, seconds: float = 0.3, seed: int = 0) -> tuple[float, float]:
    """(reads/s, share served by the device) of ``read_bytes`` at distinct random 4 KiB-aligned places of
    ``path``, one at a time, the file's pages dropped first and readahead off: the rate a reader of scattered
    samples gets from the device. A small file runs out of distinct places early (then fewer reads count)."""
    from pipeline.system.iocount import disk_read_bytes

    size = path.stat().st_size
    read_bytes = int(min(max(read_bytes, 512), size))
    step = -(-read_bytes // 4096) * 4096  # places a whole read apart: no two reads share a page
    places = np.random.default_rng(seed).permutation(max(size - read_bytes, 0) // step + 1) * step
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        before = disk_read_bytes()
        n, t0 = 0, time.perf_counter()
        for off in places.tolist():
            os.pread(fd, read_bytes, off)
            n += 1
            if n % 16 == 0 and time.perf_counter() - t0 >= seconds:
                break
        rate = n / (time.perf_counter() - t0)
        fetched = disk_read_bytes() - before if before is not None else 0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return rate, min(1.0, fetched / (n * read_bytes)) if n else 0.0


def disk(exp, max_mb: float = 256) -> Disk:
    """The export's largest file read sequentially, cold (pipeline.system.disk), then at random places."""
    from pipeline.system.disk import largest_file, sequential_read

    path = largest_file([exp.root])
    seq = sequential_read(path, max_bytes=int(max_mb * MiB))
    nbytes = int(round(exp.stored_sample_bytes))
    rate, served = random_reads(path, nbytes)
    return Disk(str(path.name), seq.mb_per_s, seq.from_disk, rate, nbytes, served)


def warm(root: Path) -> float:
    """Read every file of an export once (into the page cache); returns the seconds it took."""
    from pipeline.system.page_cache import files_of

    buf = bytearray(8 * MiB)
    t0 = time.perf_counter()
    for f in files_of([root]):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def load_average() -> float | None:
    """The machine's 1-minute load average (``os.getloadavg``), None where there is none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


@dataclass
class Facts:
    machine: Machine
    data: Data
    disk: Disk | None = None
    load_ms: float | None = None  # the serial loader (0 workers, 1 thread, no prefetch) per batch
    step_ms: float | None = None  # the training step per batch, its data already in memory
    load_average: tuple[float | None, float | None] = (None, None)  # 1-minute, before and after the trials
    batch_size: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def load_share(self) -> float | None:
        """The share of a serial step spent loading: the most any overlap can save."""
        if self.load_ms is None or self.step_ms is None or self.load_ms + self.step_ms <= 0:
            return None
        return self.load_ms / (self.load_ms + self.step_ms)

    def rows(self) -> list[tuple[str, str, str]]:
        """(fact, value, what it is) in the order the report shows them."""
        m, d, k = self.machine, self.data, self.disk
        quota = f"{m.cpu_quota:g} CPUs" if m.cpu_quota is not None else "none"
        limit = f"{m.memory_limit_mb:,.0f} MiB" if m.memory_limit_mb is not None else "none"
        out = [
            ("cores", f"{m.cores} ({m.job_cores} for this job)", f"{m.cpu}; CPU quota {quota}"),
            ("memory", f"{m.memory_room_mb:,.0f} MiB room", f"RAM {m.ram_mb:,.0f} MiB, cgroup limit {limit}"),
            ("device", m.device, "where the training step runs"),
            (
                "data",
                f"{d.export_mb:,.1f} MB ({d.storage})",
                f"{d.num_train:,} train samples, {d.stored_sample_bytes:,.0f} B stored / "
                f"{d.sample_bytes:,} B decoded a sample; "
                + (
                    "fits the page cache" if d.fits_cache else "larger than half the memory room: out of core"
                ),
            ),
            (
                "per-sample work",
                ", ".join(w for w, on in (("decode", d.decoded), ("augment", d.augmented)) if on) or "none",
                "what decode threads and workers can share",
            ),
        ]
        if k is not None:
            out.append(
                (
                    "disk",
                    f"{k.sequential_mb_per_s:,.0f} MB/s, {k.random_reads_per_s:,.0f} reads/s",
                    f"{k.file} read sequentially ({k.from_disk:.0%} from the device) and at random places "
                    f"({k.random_read_bytes:,} B each, one at a time, {k.random_from_disk:.0%} from the "
                    "device)",
                )
            )
        if self.load_ms is not None:
            out.append(
                (
                    "load",
                    f"{self.load_ms:.2f} ms/batch",
                    f"the serial loader (0 workers, 1 thread), batch {self.batch_size}: "
                    f"{1e3 * self.load_ms / max(self.batch_size, 1):.1f} µs a sample",
                )
            )
        if self.step_ms is not None:
            out.append(
                ("step", f"{self.step_ms:.2f} ms/batch", "the training step alone, on a batch in memory")
            )
        if self.load_average[0] is not None:
            before, after = self.load_average
            out.append(
                (
                    "load average",
                    f"{before:.2f} -> {after:.2f}" if after is not None else f"{before:.2f}",
                    "1 minute, before and after the trials (the tune's own work included after)",
                )
            )
        if self.load_share is not None:
            out.append(
                ("load share", f"{self.load_share:.0%}", "of a serial step: the most overlap can save")
            )
        return out

    def params(self) -> dict[str, str]:
        """Flat ``fact.*`` values for MLflow params."""
        flat: dict[str, str] = {}
        for prefix, part in (("machine", self.machine), ("data", self.data), ("disk", self.disk)):
            if part is not None:
                flat.update({f"fact.{prefix}.{k}": str(v) for k, v in asdict(part).items()})
        flat.update(
            {
                "fact.load_ms": f"{self.load_ms:.4g}" if self.load_ms is not None else "",
                "fact.step_ms": f"{self.step_ms:.4g}" if self.step_ms is not None else "",
                "fact.load_average": " -> ".join(f"{v:.2f}" for v in self.load_average if v is not None),
                "fact.machine.fingerprint": self.machine.fingerprint(),
            }
        )
        return flat
