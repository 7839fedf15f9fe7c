"""Seeds derived from the run's seed: one function, used by the data layer (placement, shuffles) and training
(augmentation, workers) alike, so neither imports the other for it.

    from pipeline.seeds import derive_seed
    rng = np.random.default_rng(derive_seed(seed, "shuffle", epoch))
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and ``parts``; nearby inputs give unrelated streams."""
    blob = ":".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1
