"""Codec benchmark: bytes per sample and decode samples/s of PNG, WebP and JPEG on real 8-bit photos.

    python -m benchmarks.codecs                                  # 62x47 grey and 64x64 RGB crops
    python -m benchmarks.codecs --num-samples 2000 --seconds 2 --shapes 62x47 64x64x3 128x128x3

Samples are crops of real photos (benchmarks/photos.py). Each codec (PNG, lossless WebP, WebP and
JPEG at ``--quality``) encodes them once with pipeline/data/codec.py; then every decoder decodes them,
one sample per call in one thread (as a DataLoader worker does), for ``--seconds`` in all: 5
rounds, the decoders taking turns within each round (so that a change in the machine's load hits
them alike); samples/s is the median over the rounds, ``vs Pillow`` its ratio to codec.py's Pillow
path measured in the same rounds. Decoders: codec.py's own path with each of its decoders
(imagecodecs, Pillow), then -- called directly, where installed -- imagecodecs' libspng, simplejpeg,
opencv-python-headless, pyspng and pyvips. Each decode is checked against the original (lossless
codecs: equal; JPEG: the PSNR, and whether the decoder agrees with Pillow's pixels). Bytes per sample
are compared with the raw uint8 array and with float32 (what float storage holds).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from pipeline.data import codec as codec_mod

ROUNDS = 5


def _module(decoder: str) -> dict:
    """pipeline.data.codec's own decode path (what the encoded format runs) with ``decoder``."""

    def make(name):
        def decode(b, s, c=codec_mod.Codec(name, 90 if name == "jpeg" else None, decoder=decoder)):
            return c.decode(b, s)

        return decode

    return {name: make(name) for name in codec_mod.CODECS}


def decoders() -> dict:
    """name -> {codec: decode(blob, shape) -> uint8 array}: this project's codec module with each of
    its decoders, then the other libraries installed here, called directly."""
    out = {f"codec.py:{d}": _module(d) for d in codec_mod.DECODERS}
    try:
        import imagecodecs

        if hasattr(imagecodecs, "spng_decode"):
            out["imagecodecs-spng"] = {"png": lambda b, s: imagecodecs.spng_decode(b)}
    except ImportError:
        pass
    try:
        import simplejpeg

        def sj(b, s):
            return simplejpeg.decode_jpeg(b, colorspace="GRAY" if len(s) == 2 else "RGB")[
                ..., : 1 if len(s) == 2 else 3
            ].reshape(s)

        out["simplejpeg"] = {"jpeg": sj}
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(1)

        def cv(b, s):
            a = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED)
            return a if a.ndim == 2 else cv2.cvtColor(a, cv2.COLOR_BGR2RGB)

        out["opencv"] = {c: cv for c in codec_mod.CODECS}
    except ImportError:
        pass
    try:
        import pyspng

        out["pyspng"] = {"png": lambda b, s: pyspng.load(b)}
    except ImportError:
        pass
    try:
        import pyvips

        out["pyvips"] = {
            c: (lambda b, s: pyvips.Image.new_from_buffer(b, "").numpy()) for c in codec_mod.CODECS
        }
    except (ImportError, OSError):
        pass
    return out


def fitted(fn):
    """``fn`` returning grey samples as [H, W] (WebP decodes them as RGB: the first channel is taken)."""

    def decode(b, s):
        a = fn(b, s)
        return a[:, :, 0] if len(s) == 2 and a.ndim == 3 else a

    return decode


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def rate(fn, blobs, shape, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while True:
        for b in blobs:
            fn(b, shape)
        n += len(blobs)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n / elapsed


def bench(shape: tuple[int, ...], n: int, seconds: float, quality: int) -> list[dict]:
    from benchmarks.photos import photo_samples

    mode = "L" if len(shape) == 2 else "RGB"
    x, _ = photo_samples(n, shape[:2], mode, seed=0)
    raw = int(np.prod(shape))
    rows = []
    decs = decoders()
    for name, q in (("png", None), ("webp", None), ("webp", quality), ("jpeg", quality)):
        c = codec_mod.Codec(name, q)
        blobs = [c.encode(img) for img in x]
        pillow = codec_mod.Codec(name, q, decoder="pillow")
        ref = [pillow.decode(b, shape) for b in blobs]
        size = float(np.mean([len(b) for b in blobs]))
        fns = {dec: fitted(table[name]) for dec, table in decs.items() if name in table}
        runs: dict = {dec: [] for dec in fns}
        for _ in range(ROUNDS):  # decoders in turn, so that the machine's load hits them alike
            for dec, fn in fns.items():
                runs[dec].append(rate(fn, blobs, shape, seconds / ROUNDS))
        pillow_rate = statistics.median(runs["codec.py:pillow"])
        for dec, fn in fns.items():
            got = [np.asarray(fn(b, shape)).reshape(shape) for b in blobs[:200]]
            sps = statistics.median(runs[dec])
            rows.append(
                {
                    "shape": "x".join(map(str, shape)),
                    "codec": c.describe(),
                    "decoder": dec,
                    "samples_per_s": sps,
                    "vs_pillow": sps / pillow_rate,
                    "bytes": size,
                    "vs_uint8": size / raw,
                    "vs_float32": size / (4 * raw),
                    "psnr_db": min(psnr(g, o) for g, o in zip(got, x)),
                    "exact": all(np.array_equal(g, o) for g, o in zip(got, x)),
                    "same_as_pillow": all(np.array_equal(g, r) for g, r in zip(got, ref)),
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    head = (
        f"{'sample':10s} {'codec':14s} {'decoder':22s} {'samples/s':>10s} {'vs Pillow':>9s} {'bytes':>7s} "
        f"{'/uint8':>7s} {'/float32':>8s} {'min PSNR':>9s} {'exact':>6s} {'=Pillow':>7s}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['shape']:10s} {r['codec']:14s} {r['decoder']:22s} {r['samples_per_s']:>10,.0f} "
            f"{r['vs_pillow']:>8.2f}x "
            f"{r['bytes']:>7,.0f} {r['vs_uint8']:>7.2f} {r['vs_float32']:>8.3f} {r['psnr_db']:>9.1f} "
            f"{str(r['exact']):>6s} {str(r['same_as_pillow']):>7s}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["62x47", "64x64x3"], help="HxW (grey) or HxWx3 (RGB)")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=2.5, help="per decoder and codec (5 rounds)")
    ap.add_argument("--quality", type=int, default=90, help="quality of the lossy codecs")
    a = ap.parse_args(argv)
    rows = []
    for text in a.shapes:
        shape = tuple(int(v) for v in text.split("x"))
        rows += bench(shape, a.num_samples, a.seconds, a.quality)
    print(table(rows))


if __name__ == "__main__":
    main()
