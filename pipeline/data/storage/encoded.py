"""``encoded``: each sample an encoded image (PNG, WebP or JPEG) in shard files, read like ``shards``,
decoded in ``__getitems__`` -- so in the DataLoader workers when there are workers.

    storage=encoded                                       # lossless PNG (the default)
    storage=encoded storage.codec=webp                    # lossless WebP: smaller, slower to encode
    storage=encoded storage.codec=jpeg storage.quality=90 # lossy (webp takes a quality too)

Only 8-bit images are encoded: the export stores the source's uint8 codes (pipeline/data/quantize.py, as
``storage.dtype=uint8`` does) and the manifest's value mapping gives the model the values float storage
would have; a source that is not 8-bit, or samples that are not ``[H, W]`` / ``[H, W, 3]``, are refused by
the config check. Codec, quality and decoder are part of the export: the manifest records them
(``format_identity``, with the decoder's version: lossy pixels depend on it), the fingerprint includes them.

Layout (``LAYOUT`` 1), in ``encoded/``: ``shard-00000.bin`` ... the records (one encoded image each) back to
back; ``offsets.npy`` the end byte of each record in its shard and ``crc32.npy`` each record's CRC-32, both
record after record, shard after shard; ``placement.npy`` the sample id of each record (a seeded
permutation, as ``shards``: ``storage.placement_seed``); ``index.json`` the shards (file, record count,
bytes), the codec and the layout. A shard closes once its records reach ``storage.shard_size_mb`` MiB.

The writer encodes each chunk (threads: Pillow's encoders release the GIL) and appends the records to a
spill file in id order; at ``close`` it writes each shard front to back, its records read from the spill in
placement order, and removes the spill -- never more than a chunk of samples or one shard in memory. In a
parallel export each worker encodes its parts (``EncodePart``) into part files of their own
(``encoded/parts/``, in the export's temp folder) and returns each record's size and CRC-32; ``close`` then
reads the records from the part files instead of the spill. A record's bytes depend only on its sample, so
the shards are the same bytes for any split into parts and any number of workers.

Reading is ``shards``' (pipeline/data/storage/sharded.py): buffers of ``storage.shuffle_buffer_shards``
shards read sequentially (``storage.buffers``: memory, mapped, auto), shuffled in memory; ``read_into``
checks each record's CRC-32 and decodes it straight from the buffer (or the file's memory map) into the
batch (``codec.Codec``) -- in the DataLoader workers when there are workers. The epoch's order is a function
of (seed, epoch) only, so batches are the same for any number of workers and with ``loader.thread_prefetch``.
A record whose bytes fail their CRC or do not decode raises ``SampleReadError``
naming the shard file and the sample id; a shard file shorter (or longer) than the index says fails when the
Dataset is built, naming the file (and, truncated later, when it is read).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.config.checks import ConfigError, require
from pipeline.config.schema import Choice, StoredDtype
from pipeline.data.codec import Codec, CodecError, problem
from pipeline.data.integrity import ExportError, IntegrityError, sample_error
from pipeline.data.readers.files import LOCAL, RecordFile
from pipeline.data.sources.base import is_image
from pipeline.data.storage.base import PartWriter
from pipeline.data.storage.base import Writer as BaseWriter
from pipeline.data.storage.sharded import (
    PLACEMENT,
    ShardedDataset,
    ShardedFormat,
    load_index,
    load_placement,
    placement,
    uncache,
)
from pipeline.data.storage.shards import MIB, ShardsConfig

log = logging.getLogger(__name__)

FOLDER = "encoded"
INDEX = "index.json"
OFFSETS = "offsets.npy"
CRC = "crc32.npy"
SPILL = "records.spill"
PARTS = "parts"  # a parallel export's part files (removed by close)
LAYOUT = 1


class CodecName(Choice):
    png = "png"  # lossless
    webp = "webp"  # lossless without a quality, lossy with one
    jpeg = "jpeg"  # lossy: needs a quality


class CodecDecoder(Choice):
    imagecodecs = "imagecodecs"  # faster than Pillow on photo crops (docs/compact-samples.md)
    pillow = "pillow"  # the reference


@dataclass
class EncodedConfig(ShardsConfig):
    """Shards of encoded images (docs/compact-samples.md); shard_size_mb counts encoded bytes."""

    name: str = "encoded"
    dtype: StoredDtype = StoredDtype.uint8  # always: a codec takes the source's 8-bit codes
    codec: CodecName = CodecName.png  # lossless by default
    quality: Optional[int] = None  # 1..100 for lossy webp or jpeg; null: lossless (jpeg needs one)
    decoder: CodecDecoder = CodecDecoder.imagecodecs  # part of the export: lossy pixels depend on it


def shard_name(s: int) -> str:
    return f"shard-{s:05d}.bin"


def codec_of(cfg) -> Codec:
    quality = cfg.get("quality")
    return Codec(
        str(cfg.get("codec", "png")),
        None if quality is None else int(quality),
        str(cfg.get("decoder", "imagecodecs")),
    )


def shard_cuts(sizes: np.ndarray, shard_bytes: float) -> np.ndarray:
    """The shard of each record (records in file order, ``sizes`` bytes each): a shard holds the records that
    start within its ``shard_bytes``, so each holds at least one and at most one record more than fits."""
    starts = np.cumsum(sizes) - sizes
    _, shard = np.unique(starts // max(int(shard_bytes), 1), return_inverse=True)
    return shard.reshape(-1).astype(np.int64)


def part_name(first: int) -> str:
    return f"part-{first:012d}.bin"


class EncodePart(PartWriter):
    """A worker's side of the Writer: encodes a part's samples into ``parts/part-<first>.bin``; returns each
    record's size and CRC-32."""

    def __init__(self, folder: Path, codec: Codec) -> None:
        self.folder, self.codec = Path(folder), codec

    def write(self, first: int, x: np.ndarray, y: np.ndarray, args) -> tuple[np.ndarray, np.ndarray]:
        blobs = [self.codec.encode(sample) for sample in x]
        with open(self.folder / part_name(first), "wb") as fh:
            fh.write(b"".join(blobs))
        sizes = np.array([len(b) for b in blobs], dtype=np.int64)
        return sizes, np.array([zlib.crc32(b) for b in blobs], dtype=np.uint32)


class _Readers:
    """Read descriptors of the record files (the spill, the part files), at most ``MAX_OPEN`` open."""

    MAX_OPEN = 256

    def __init__(self, paths: list[Path]) -> None:
        self.paths, self.fds = paths, {}

    def fd(self, k: int) -> int:
        fd = self.fds.get(k)
        if fd is None:
            if len(self.fds) >= self.MAX_OPEN:
                self.close()
            fd = self.fds[k] = os.open(self.paths[k], os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # record by record: no readahead
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


SPILL_SOURCE = -1  # a record source that is the spill, not a part file (parts are named by their first id)


class AssembleShard:
    """Shard ``shard`` written front to back, its records read from their sources (``sources[which[j]]``: the
    spill, or the part file of that first id) at ``at[j]``, ``lens[j]`` bytes each. Picklable: a parallel
    export runs these on its workers (``Writer.finish_tasks``), a serial one in ``close``."""

    def __init__(self, folder: Path, shard: int, sources, which, at, lens) -> None:
        self.folder, self.shard = Path(folder), int(shard)
        self.sources, self.which = np.asarray(sources), np.asarray(which, dtype=np.int64).reshape(-1)
        self.at, self.lens = np.asarray(at, dtype=np.int64), np.asarray(lens, dtype=np.int64)

    def run(self) -> int:
        paths = [
            self.folder / (SPILL if f == SPILL_SOURCE else f"{PARTS}/{part_name(f)}") for f in self.sources
        ]
        readers = _Readers(paths)
        data = bytearray(int(self.lens.sum()))
        view, at = memoryview(data), 0
        try:
            for k, offset, length in zip(self.which.tolist(), self.at.tolist(), self.lens.tolist()):
                if os.preadv(readers.fd(k), [view[at : at + length]], offset) != length:
                    raise ExportError(f"{paths[k]} ended early (shard {self.shard})")
                at += length
        finally:
            readers.close()
        with open(self.folder / shard_name(self.shard), "wb") as fh:
            fh.write(data)
        return len(data)


class Writer(BaseWriter):
    """Encodes each chunk into a spill file (id order), or takes the part files workers encoded
    (``commit``); ``close`` writes the shards in placement order (or the workers did: ``finish_tasks``)."""

    def __init__(self, root: Path, spec, cfg) -> None:
        if spec.dtype != "uint8" or not is_image(spec.shape, rgb_only=True):
            raise ExportError(
                f"storage=encoded stores 8-bit images of [H, W] or [H, W, 3]; the samples are {spec.dtype} "
                f"{list(spec.shape)}"
            )
        self.folder = Path(root) / FOLDER
        self.folder.mkdir(parents=True)
        self.spec, self.codec = spec, codec_of(cfg)
        self.shard_bytes = float(cfg.shard_size_mb) * MIB
        self.seed = int(cfg.get("placement_seed", 0))
        self.sizes = np.zeros(spec.num_samples, dtype=np.int64)
        self.crc = np.zeros(spec.num_samples, dtype=np.uint32)
        self.spill = open(self.folder / SPILL, "wb")
        self.pool = None  # encoding threads, started by the first ``write``
        self.next_id = 0
        self.spill_end = 0
        self.sources = [SPILL_SOURCE]  # where records are before close: the spill, then part files (firsts)
        self.file_of = np.zeros(spec.num_samples, dtype=np.int32)  # each sample's record file (its source)
        self.at = np.zeros(spec.num_samples, dtype=np.int64)  # and its record's offset there
        self.paths: list[Path] = []
        self.stored_bytes = 0  # encoded bytes of all records (the export records it per sample)
        self.plan = None  # what close writes: computed once every record's size is known
        self.assembled = False  # the shards were written by the export's workers (finish_tasks)

    def write(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="encode")
        blobs = list(self.pool.map(self.codec.encode, x))
        a, b = self.next_id, self.next_id + len(blobs)
        self.sizes[a:b] = [len(blob) for blob in blobs]
        self.crc[a:b] = [zlib.crc32(blob) for blob in blobs]
        self.at[a:b] = self.spill_end + np.cumsum(self.sizes[a:b]) - self.sizes[a:b]
        self.spill.write(b"".join(blobs))
        self.spill_end += int(self.sizes[a:b].sum())
        self.next_id = b

    def part_writer(self) -> EncodePart:
        (self.folder / PARTS).mkdir(exist_ok=True)
        return EncodePart(self.folder / PARTS, self.codec)

    def commit(self, first: int, n: int, result) -> None:
        sizes, crc = result
        a, b = first, first + n
        self.sizes[a:b], self.crc[a:b] = sizes, crc
        self.file_of[a:b] = len(self.sources)
        self.at[a:b] = np.cumsum(sizes) - sizes
        self.sources.append(first)

    def _plan(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[AssembleShard]]:
        """The sample id of each record, its size, its end in its shard, and a task per shard."""
        if self.plan is None:
            n = self.spec.num_samples
            order = placement(n, self.seed)  # the sample id of each record
            sizes = self.sizes[order]
            shard = shard_cuts(sizes, self.shard_bytes)
            counts = np.bincount(shard, minlength=int(shard[-1]) + 1 if n else 0)
            ends = np.empty(n, dtype=np.int64)  # each record's end in its shard
            tasks, first = [], 0
            for s, count in enumerate(counts.tolist()):
                ids = order[first : first + count]
                ends[first : first + count] = np.cumsum(sizes[first : first + count])
                used, which = np.unique(self.file_of[ids], return_inverse=True)
                sources = np.asarray(self.sources, dtype=np.int64)[used]
                tasks.append(
                    AssembleShard(self.folder, s, sources, which, self.at[ids], sizes[first : first + count])
                )
                first += count
            self.plan = order, sizes, ends, tasks
        return self.plan

    def finish_tasks(self) -> list[AssembleShard] | None:
        """A parallel export's shards, one task each, assembled on the workers from the part files."""
        return self._plan()[3] if len(self.sources) > 1 else None

    def finished(self, results: list) -> None:
        self.assembled = True

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.spill.close()
        n = self.spec.num_samples
        order, _sizes, ends, tasks = self._plan()
        if not self.assembled:
            for task in tasks:
                task.run()
        shards = [
            {"file": shard_name(t.shard), "count": len(t.lens), "bytes": int(t.lens.sum())} for t in tasks
        ]
        self.paths = [self.folder / shard_name(t.shard) for t in tasks]
        os.unlink(self.folder / SPILL)
        shutil.rmtree(self.folder / PARTS, ignore_errors=True)
        np.save(self.folder / PLACEMENT, order, allow_pickle=False)
        np.save(self.folder / OFFSETS, ends, allow_pickle=False)
        np.save(self.folder / CRC, self.crc[order], allow_pickle=False)
        self.stored_bytes = int(self.sizes.sum())
        index = {
            "layout": LAYOUT,
            "num_samples": n,
            "shape": list(self.spec.shape),
            "codec": {
                "name": self.codec.name,
                "quality": self.codec.quality,
                "lossless": self.codec.lossless,
                "decoder": self.codec.decoder,
            },
            "placement": {"kind": "seeded random permutation", "seed": self.seed, "file": PLACEMENT},
            "offsets": OFFSETS,
            "crc32": CRC,
            "shards": shards,
        }
        (self.folder / INDEX).write_text(json.dumps(index, indent=1))

    def after_sync(self) -> None:
        """Once synced: the shards leave the page cache (``shards.uncache``): the first read is a real one."""
        uncache(self.paths)


def _array(path: Path, n: int, kinds: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise IntegrityError(f"{path} cannot be read: {err}; delete the export to re-export") from err
    if arr.shape != (n,) or arr.dtype.kind not in kinds:
        raise IntegrityError(f"{path} holds {arr.shape} {arr.dtype}, not one entry per record of the {n}")
    return arr


class Dataset(ShardedDataset):
    NAME = "encoded"
    per_sample_work = True  # each record decoded

    def __init__(self, root: Path, spec, labels: np.ndarray, ids: np.ndarray, cfg=None, files=None) -> None:
        super().__init__(spec, labels, ids)
        self.source = files if files is not None else LOCAL
        self.root, self.folder = Path(root), Path(root) / FOLDER
        path = self.folder / INDEX
        index = load_index(path, LAYOUT, "encoded shards")
        try:
            shards = [(str(s["file"]), int(s["count"]), int(s["bytes"])) for s in index["shards"]]
            recorded = index["codec"]
            self.codec = Codec(recorded["name"], recorded["quality"], recorded["decoder"].split()[0])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise IntegrityError(f"{path} is malformed ({err!r}); delete the export to re-export") from err
        n = spec.num_samples
        if (
            index.get("num_samples") != n
            or index.get("shape") != list(spec.shape)
            or sum(c for _, c, _ in shards) != n
            or any(c < 1 or Path(f).name != f or not f.endswith(".bin") for f, c, _ in shards)
        ):
            raise IntegrityError(f"{path} does not match the manifest or names a bad file; delete the export")
        if not self.codec.lossless and recorded["decoder"] != self.codec.decoder:
            log.warning(
                "encoded: %s was exported with %s; decoding with %s may give other pixels",
                self.root.name,
                recorded["decoder"],
                self.codec.decoder,
            )
        order = load_placement(self.folder / PLACEMENT, n)
        ends = _array(self.folder / OFFSETS, n, "iu").astype(np.int64)
        self.crc = _array(self.folder / CRC, n, "u").astype(np.uint32)
        files, first = [], 0
        for name, count, size in shards:
            offsets = np.concatenate(([0], ends[first : first + count]))
            if (np.diff(offsets) <= 0).any() or offsets[-1] != size:
                raise IntegrityError(
                    f"{self.folder / OFFSETS} disagrees with {path} on {name}; delete the export"
                )
            files.append(RecordFile(self.folder / name, 0, count, offsets=offsets))
            first += count
            try:
                actual = self.source.size(self.folder / name)
            except OSError as err:
                raise IntegrityError(
                    f"{self.folder / name} cannot be read: {err}; delete the export"
                ) from err
            if actual != size:
                why = "truncated" if actual < size else "longer than written"
                raise IntegrityError(
                    f"{self.folder / name} is damaged: {actual} bytes, its {count} records end at byte "
                    f"{size} ({why}); delete the export to re-export"
                )
        self.place(files, order, labels, ids, cfg)

    def _damaged(self, position: int, why) -> Exception:
        path = self.files[int(self.shard_of[position])].path
        return sample_error(int(self.ids[position]), path, why, self.root)

    def _decode(self, record: np.ndarray, position: int, out: np.ndarray) -> None:
        """One record, checked against its CRC-32, decoded into ``out``."""
        if zlib.crc32(record) != int(self.crc[self.slot[position]]):
            raise self._damaged(position, "its bytes fail their CRC-32 (the record is corrupted)")
        try:
            self.codec.decode_into(record, out)
        except CodecError as err:
            raise self._damaged(position, err) from err

    def from_buffer(self, data: np.ndarray, loc: np.ndarray, size: np.ndarray, positions, out) -> None:
        for j, (a, n) in enumerate(zip(loc.tolist(), size.tolist())):
            self._decode(data[a : a + n], int(positions[j]), out[j])

    def from_files(self, positions: np.ndarray, out: np.ndarray) -> None:
        """Through the stream's memory maps: per-item use, plots, the mapped buffers' batches."""
        for j, (s, r) in enumerate(zip(self.shard_of[positions].tolist(), self.local[positions].tolist())):
            self._decode(self.stream.mapped_record(s, r), int(positions[j]), out[j])


class Encoded(ShardedFormat):
    name = "encoded"
    config = EncodedConfig
    layout = LAYOUT
    writer_class = Writer
    dataset_class = Dataset

    def identity(self, cfg) -> dict:
        """What the export's samples depend on beyond its config: the decoder's version (lossy pixels differ
        between decoders). The export's fingerprint includes it; its manifest records it."""
        c = codec_of(cfg)
        return {"codec": c.describe(), "decoder": c.decoder}

    def validate(self, cfg) -> None:
        """A valid codec setting, and a source of 8-bit images (the codec takes uint8 codes)."""
        from pipeline.data.quantize import NotEightBit, divisor_for
        from pipeline.data.sources import get_source

        sto, src = cfg.storage, cfg.source
        why = problem(str(sto.codec), sto.quality)
        require(why is None, "storage.quality", sto.quality, f"{why} (storage.codec={sto.codec})")
        require(
            str(sto.dtype) == "uint8",
            "storage.dtype",
            str(sto.dtype),
            "storage=encoded stores the source's 8-bit codes: leave storage.dtype=uint8 (its default)",
        )
        try:
            divisor_for(src)
        except NotEightBit as err:
            raise ConfigError(
                "storage",
                "encoded",
                f"{err}. storage=encoded encodes 8-bit images: {EIGHT_BIT_IMAGES}; or use storage=shards",
            ) from None
        super().validate(cfg)
        shape = get_source(src.name).shape(src)
        require(
            shape is None or is_image(shape, rgb_only=True),
            "storage",
            "encoded",
            f"source={src.name} with source.shape={list(shape or ())}: a codec takes images of [H, W] (grey) "
            f"or [H, W, 3] (RGB). storage=encoded encodes 8-bit images: {EIGHT_BIT_IMAGES}; "
            "or use storage=shards",
        )


EIGHT_BIT_IMAGES = (
    "source=image_folder, lfw with source.color=true, digits, or synthetic with source.dtype=uint8 and "
    "source.shape [H, W] or [H, W, 3]"
)

FORMAT = Encoded()
