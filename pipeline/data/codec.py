"""Encode and decode one 8-bit image: PNG, WebP or JPEG -- the sample codec of the ``encoded`` format.

    from pipeline.data.codec import Codec
    c = Codec("png")                       # lossless: png, or webp without a quality
    c = Codec("webp", quality=80)          # lossy: webp or jpeg with a quality in 1..100
    blob = c.encode(img)                   # img: uint8 [H, W] (grey) or [H, W, 3] (RGB) -> bytes
    img = c.decode(blob, (H, W))           # uint8 array of that shape; CodecError if the blob is not one
    c.decode_into(blob, out[i])            # into a preallocated uint8 view (a batch array's row)
    x = c.decode_batch(blobs, (H, W))      # uint8 [len(blobs), H, W]: a batch, one decode per blob
    c.lossless, c.describe(), c.decoder    # True/False, "webp q80", "imagecodecs 2026.3.6"
    Codec("jpeg", 90, decoder="pillow")    # the reference decoder instead
    problem("jpeg", None)                  # the config check: a message, or None when valid

Encoding is Pillow's (PNG compress level 6; lossless WebP at effort 100, method 4; JPEG 4:2:0 at the
quality). Decoding is imagecodecs' by default (``DECODER``): on real photo crops it decoded PNG 1.4-2.2x,
lossless WebP 2x and JPEG 4.3x faster than Pillow, to the same pixels (docs/compact-samples.md,
``python -m benchmarks.codecs``); Pillow stays as the reference the tests compare it to. A lossy
codec's pixels depend on the decoder, so an export should record ``c.decoder``. Lossless codecs give
back the exact pixels; lossy ones lose the PSNR that docs/compact-samples.md states.
WebP holds no grey images: a grey sample is encoded as RGB with three equal channels and decoded back
to its first channel (exact when lossless).
"""

from __future__ import annotations

import io

import numpy as np

CODECS = ("png", "webp", "jpeg")
DECODERS = ("imagecodecs", "pillow")
DECODER = "imagecodecs"  # chosen by measurement: docs/compact-samples.md


class CodecError(ValueError):
    """A blob that does not decode to the expected image, or an image the codec cannot take."""


def problem(name: str, quality) -> str | None:
    """Why ``(name, quality)`` is not a valid codec setting, or None."""
    if name not in CODECS:
        return f"codec {name!r} is not one of {list(CODECS)}"
    if quality is None:
        return f"{name} is lossy: give a quality in 1..100" if name == "jpeg" else None
    if name == "png":
        return "png is lossless and takes no quality (leave it null)"
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        return f"quality={quality!r} must be an integer in 1..100 (or null for lossless webp)"
    return None


def _check_image(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise CodecError(f"a codec takes uint8 [H, W] or [H, W, 3] images, got {img.dtype} {img.shape}")
    return np.ascontiguousarray(img)


class Codec:
    def __init__(self, name: str, quality: int | None = None, decoder: str = DECODER) -> None:
        why = problem(name, quality)
        if why is None and decoder not in DECODERS:
            why = f"decoder {decoder!r} is not one of {list(DECODERS)}"
        if why is not None:
            raise CodecError(why)
        self.name, self.quality = name, quality
        self.lossless = name == "png" or (name == "webp" and quality is None)
        self._decode = _imagecodecs if decoder == "imagecodecs" else _pillow
        self.decoder = f"{decoder} {_version(decoder)}"

    def describe(self) -> str:
        if self.name == "png":
            return "png"
        return f"{self.name} lossless" if self.lossless else f"{self.name} q{self.quality}"

    def encode(self, img: np.ndarray) -> bytes:
        from PIL import Image

        img = _check_image(img)
        if self.name == "webp" and img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        buf = io.BytesIO()
        pil = Image.fromarray(img)
        if self.name == "png":
            pil.save(buf, "PNG", compress_level=6)
        elif self.name == "webp":
            opts = dict(lossless=True, quality=100) if self.lossless else dict(quality=self.quality)
            pil.save(buf, "WEBP", method=4, exact=True, **opts)
        else:
            pil.save(buf, "JPEG", quality=self.quality, subsampling="4:2:0")
        return buf.getvalue()

    def decode(self, blob: bytes, shape) -> np.ndarray:
        out = np.empty(tuple(shape), dtype=np.uint8)
        self.decode_into(blob, out)
        return out

    def decode_batch(self, blobs, shape) -> np.ndarray:
        """The blobs decoded into one uint8 array [len(blobs), *shape] (what ``__getitems__`` returns)."""
        out = np.empty((len(blobs), *shape), dtype=np.uint8)
        for i, blob in enumerate(blobs):
            self.decode_into(blob, out[i])
        return out

    def decode_into(self, blob: bytes, out: np.ndarray) -> None:
        """Decode ``blob`` into ``out`` (uint8, [H, W] or [H, W, 3]); CodecError names a mismatch."""
        try:
            img = self._decode(self.name, blob)
        except CodecError:
            raise
        except Exception as err:  # each library raises its own types for a broken blob
            raise CodecError(f"{self.describe()} blob of {len(blob)} bytes does not decode: {err}") from err
        if img.ndim == 3 and out.ndim == 2:  # WebP decodes grey samples as RGB
            img = img[:, :, 0]
        if img.shape != out.shape:
            raise CodecError(f"{self.describe()} blob decodes to {img.shape}, expected {out.shape}")
        out[...] = img


def _version(decoder: str) -> str:
    if decoder == "pillow":
        from PIL import __version__
    else:
        from imagecodecs import __version__
    return __version__


def _pillow(name: str, blob: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as img:
        if img.format != name.upper():
            raise CodecError(f"blob holds {img.format}, not {name}")
        return np.asarray(img)


def _imagecodecs(name: str, blob: bytes) -> np.ndarray:
    import imagecodecs

    if name == "png":
        return imagecodecs.png_decode(blob)
    if name == "webp":
        return imagecodecs.webp_decode(blob, hasalpha=False)
    return imagecodecs.jpeg8_decode(blob)
