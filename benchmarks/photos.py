"""Real 8-bit photos for benchmarks, offline: crops of the photos that scikit-learn and matplotlib ship.

    from benchmarks.photos import photo_samples, write_image_folder
    x, y = photo_samples(1000, (62, 47), seed=0)          # uint8 [n, 62, 47] (grey) or [n, H, W, 3]
    python -m benchmarks.photos /work/data/photos --num-samples 20000 --size 64 64 --mode RGB
    python -m benchmarks.photos /work/data/lfw --lfw --num-samples 60000   # for source=lfw

Three photos (scikit-learn's ``china.jpg`` and ``flower.jpg``, matplotlib's ``grace_hopper.jpg``); a
sample is a random window (a side of 48 to 256 pixels, the aspect of the sample) of one of them,
resized to the sample size with Pillow's bilinear filter -- real photographic content at real
statistics, not noise, which matters to what a codec makes of it. The label is the photo (3 classes).
``write_image_folder`` lays the samples out for ``source=image_folder`` as PNGs (lossless, so the
export sees exactly these pixels), one folder per photo. ``write_lfw_layout`` writes 250x250 RGB crops
as JPEGs in the layout of scikit-learn's LFW cache, so ``source=lfw source.data_home=ROOT`` reads them
with the real LFW code: float32 samples (``color=true``: ``k / 255``) from real 8-bit photos, the case
where 8-bit and encoded storage shrink the bytes on disk.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

NAMES = ("china", "flower", "grace_hopper")


def photos() -> list[np.ndarray]:
    """The three photos as uint8 RGB arrays."""
    import matplotlib
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sk = load_sample_images().images  # china, flower
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(hopper) as img:
        return [*(np.asarray(a, dtype=np.uint8) for a in sk), np.asarray(img.convert("RGB"))]


def photo_samples(n: int, size: tuple[int, int], mode: str = "L", seed: int = 0):
    """``n`` crops of size [H, W] (``mode`` L: grey [n, H, W]; RGB: [n, H, W, 3]) and their photo labels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(p).convert(mode) for p in photos()]
    h, w = size
    shape = (n, h, w) if mode == "L" else (n, h, w, 3)
    x = np.empty(shape, dtype=np.uint8)
    y = rng.integers(0, len(images), size=n).astype(np.int64)
    for i in range(n):
        img = images[y[i]]
        scale = rng.uniform(48, 256) / max(h, w)
        ch, cw = min(img.height, round(h * scale)), min(img.width, round(w * scale))
        top, left = rng.integers(0, img.height - ch + 1), rng.integers(0, img.width - cw + 1)
        crop = img.resize((w, h), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
        x[i] = np.asarray(crop, dtype=np.uint8)
    return x, y


def write_image_folder(root: Path, n: int, size: tuple[int, int], mode: str = "L", seed: int = 0) -> Path:
    """``n`` photo crops as ``root/<photo>/<i>.png`` (an input for ``source=image_folder``)."""
    from PIL import Image

    root = Path(root)
    x, y = photo_samples(n, size, mode, seed)
    for name in NAMES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(x, y)):
        Image.fromarray(img).save(root / NAMES[label] / f"{i:07d}.png")
    return root


def write_lfw_layout(root: Path, n: int, seed: int = 0, per_person: int = 10) -> Path:
    """``n`` 250x250 photo crops as scikit-learn's LFW cache under ``root`` (a ``source.data_home``):
    ``lfw_home/lfw_funneled/<person>/<person>_<i>.jpg``, ``per_person`` images a person."""
    from PIL import Image

    home = Path(root) / "lfw_home"
    for start in range(0, n, 1000):
        x, _ = photo_samples(min(1000, n - start), (250, 250), "RGB", seed + start)
        for i, img in enumerate(x, start):
            person = f"Person_{i // per_person:06d}"
            folder = home / "lfw_funneled" / person
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{person}_{i % per_person + 1:04d}.jpg", quality=95)
    for name in ("pairsDevTrain.txt", "pairsDevTest.txt", "pairs.txt"):
        (home / name).write_text("1\n")
    return Path(root)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--num-samples", type=int, default=20_000)
    ap.add_argument("--size", type=int, nargs=2, default=[62, 47], metavar=("H", "W"))
    ap.add_argument("--mode", choices=["L", "RGB"], default="L")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--lfw", action="store_true", help="250x250 RGB JPEGs in LFW's layout (size, mode ignored)"
    )
    a = ap.parse_args(argv)
    if a.lfw:
        write_lfw_layout(a.root, a.num_samples, a.seed)
        print(f"{a.num_samples} photo crops in LFW's layout: source=lfw source.data_home={a.root}")
        return
    write_image_folder(a.root, a.num_samples, tuple(a.size), a.mode, a.seed)
    print(f"{a.num_samples} {a.mode} photo crops of {a.size[0]}x{a.size[1]} in {a.root}")


if __name__ == "__main__":
    main()
