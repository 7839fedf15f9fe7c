"""Build small image folders for tests: root/<class>/<image>, learnable, PNG and JPEG, one broken file.

from tests.image_folders import make_image_folder
root = make_image_folder(tmp_path / "imgs", per_class=12, broken=True)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("circle", "square", "stripes")
BROKEN = "square/broken.png"  # a PNG signature followed by garbage


def draw(name: str, rng: np.random.Generator, h: int = 40, w: int = 48) -> np.ndarray:
    """An RGB uint8 image of one of CLASSES: a red disc, a green square or blue stripes on noise."""
    a = np.full((h, w, 3), rng.integers(0, 60), dtype=np.int64)
    if name == "circle":
        yy, xx = np.mgrid[:h, :w]
        a[(yy - h // 2) ** 2 + (xx - w // 2) ** 2 < (min(h, w) // 3) ** 2] = (220, 60, 60)
    elif name == "square":
        a[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (60, 220, 60)
    else:
        a[:, ::6] = (60, 60, 220)
    return np.clip(a + rng.integers(0, 40, a.shape), 0, 255).astype(np.uint8)


def make_image_folder(root: Path, per_class: int = 12, broken: bool = True, seed: int = 0) -> Path:
    """Images alternate between PNG and JPEG; ``broken`` adds ``BROKEN``, which Pillow cannot read."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(draw(name, rng)).save(root / name / f"{i:03d}.{ext}")
    if broken:
        (root / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    return root
