"""8-bit storage: samples of an 8-bit source stored as uint8 codes, read back to the exact same values.

    storage.dtype=uint8                                   # on the command line, any array format
    from pipeline.data import quantize
    d = quantize.divisor_for(cfg.source)                  # 255.0, or raises NotEightBit naming why
    codes = quantize.encode(x, d)                         # uint8; raises NotEightBit if any value is off
    quantize.levels(d)[codes]                             # == x, bitwise

The mapping, recorded in the export's manifest as ``"values": {"stored": "uint8", "divisor": d}``:
a stored code ``k`` stands for ``float32(k) / float32(d)``, the correctly rounded float32 quotient --
exactly what numpy computes for ``uint8 / d`` in float32, and what scikit-learn's LFW loader does
(``face /= 255.0`` on float32 faces). ``encode`` checks every value of every chunk against that
table, so an export is either exact or refused. The model maps codes to values with the same
division (pipeline/training/models.py); the test suite checks it against ``levels`` bit for bit.

Which sources are 8-bit (each source module's ``uint8_divisor(cfg)``: a divisor, or why not):
``lfw`` with ``source.color=true`` (values k/255), ``image_folder`` (uint8 already), ``digits``
(k/16), ``synthetic`` with ``source.dtype=uint8``. Grey LFW is not: scikit-learn averages the three
channels' k/255 values in float32, which gives 1,177 distinct values (found by replaying its
arithmetic over all 256^3 colours) -- more than 8 bits hold -- so it is refused, naming the source.
"""

from __future__ import annotations

import numpy as np

DEFAULT_DIVISOR = 255.0  # uint8 samples with no recorded mapping (image folders) are k / 255


class NotEightBit(ValueError):
    """The source's values are not all ``float32(k) / float32(divisor)`` for k in 0..255."""


def levels(divisor: float | None) -> np.ndarray:
    """The 256 values codes 0..255 stand for: ``float32(k) / float32(divisor)``."""
    d = np.float32(DEFAULT_DIVISOR if divisor is None else divisor)
    return np.arange(256, dtype=np.float32) / d


def divisor_for(source_cfg) -> float:
    """The divisor of an 8-bit source (its ``SourceKind.eight_bit``); NotEightBit says why not."""
    from pipeline.data.sources import get_source

    answer = get_source(source_cfg.name).eight_bit(source_cfg)
    if isinstance(answer, str):
        raise NotEightBit(f"source={source_cfg.name}: {answer}")
    return float(answer)


def encode(x: np.ndarray, divisor: float, first_id: int = 0) -> np.ndarray:
    """``x`` as uint8 codes, checked to decode to ``x`` exactly; NotEightBit names the first value
    that does not (``first_id`` is the id of ``x[0]``, for the message)."""
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    with np.errstate(invalid="ignore"):  # NaN and out-of-range values fail the check below
        codes = np.rint(np.asarray(x, dtype=np.float64) * float(divisor))
        np.clip(codes, 0, 255, out=codes)
        codes = codes.astype(np.uint8)
    back = levels(divisor)[codes].astype(x.dtype, copy=False)
    same = back.view(f"u{back.itemsize}") == np.ascontiguousarray(x).view(f"u{back.itemsize}")
    if not bool(same.all()):
        where = np.unravel_index(int(np.argmin(same.reshape(-1))), x.shape)
        raise NotEightBit(
            f"sample {first_id + int(where[0])} holds {x[where]!r} at {tuple(int(i) for i in where[1:])}, "
            f"which is not k/{divisor:g} for an integer k in [0, 255]; use storage.dtype=source"
        )
    return codes


def mapping(divisor: float) -> dict:
    """What the manifest records about uint8 storage."""
    return {
        "stored": "uint8",
        "divisor": float(divisor),
        "value": f"float32(code) / float32({divisor:g})",
    }
