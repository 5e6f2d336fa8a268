"""A small, real, deterministic image set for tests, demos and benchmarks.

Colour photos shipped inside scikit-image (one class per photo) are cropped at random boxes and
rescaled to varied sizes (some non-square), then written as an ImageFolder tree
``root/<class>/<class>_<index>.jpg``. The same (images_per_class, seed, sizes, classes) always gives
the same pixels, so benchmarks and tests are repeatable without any download.

``make_demo_splits`` writes a training set and a held-out set that share no source pixel. There is one
photo per class, so the split cannot be by photo; it is by region: each photo is cut at mid-width, the
training crops come from its left half and the held-out crops from its right half. A crop never crosses
the cut, so no held-out image is a crop, rescale or near-duplicate of any part of a training image, while
every class is in both splits. Mid-width (rather than a smaller held-out band) keeps the two splits'
crop statistics identical (the same crop fractions of a half of the same size), and every photo is
landscape or square, so both halves are at least 225 x 300 px and, inspected, still show the class
(astronaut's suit, cup and saucer, cat's face, launch towers, galaxies, stained tissue, fundus with
vessels, motorcycle).

CLI: ``python -m data_tools.demo_images OUT --per-class N [--held-out-per-class M]``.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# skimage.data functions returning (H, W, 3) uint8 colour photos that need no optional download.
SOURCE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                 "immunohistochemistry", "retina", "stereo_motorcycle")
# Split name -> which half of each photo (0: left, 1: right) its crops come from.
SPLIT_HALVES = {"train": 0, "held_out": 1}


@dataclass(frozen=True)
class DemoSplits:
    """The two ImageFolder roots written by ``make_demo_splits`` (same class sub-directories)."""

    train: Path
    held_out: Path


def load_photo(name: str) -> np.ndarray:
    """The named scikit-image sample photo as (H, W, 3) uint8 RGB."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo pairs: take the left image
        image = image[0]
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"skimage.data.{name} is not a colour photo (shape {image.shape})")
    return np.ascontiguousarray(image[..., :3])


def photo_half(photo: np.ndarray, half: int) -> np.ndarray:
    """The left (``half`` 0) or right (1) half of an (H, W, 3) photo, cut at mid-width: (H, W // 2, 3)
    or (H, W - W // 2, 3); the two halves share no pixel."""
    cut = photo.shape[1] // 2
    return photo[:, :cut] if half == 0 else photo[:, cut:]


def random_variant(photo: np.ndarray, rng: np.random.Generator, min_side: int, max_side: int) -> Image.Image:
    """One random crop of ``photo`` (30-100% of each side) rescaled so that both sides lie in
    [min_side, max_side] px: the longer side is drawn uniformly, the shorter follows the crop's aspect
    (clamped up to ``min_side``)."""
    height, width = photo.shape[:2]
    crop_w = int(rng.integers(max(1, int(0.3 * width)), width + 1))
    crop_h = int(rng.integers(max(1, int(0.3 * height)), height + 1))
    x = int(rng.integers(0, width - crop_w + 1))
    y = int(rng.integers(0, height - crop_h + 1))
    crop = Image.fromarray(photo[y:y + crop_h, x:x + crop_w])
    long_side = int(rng.integers(min_side, max_side + 1))
    short_side = max(min_side, round(long_side * min(crop_w, crop_h) / max(crop_w, crop_h)))
    size = (long_side, short_side) if crop_w >= crop_h else (short_side, long_side)
    return crop.resize(size, Image.Resampling.BICUBIC)


def write_variants(photo: np.ndarray, rng: np.random.Generator, class_dir: Path, stem: str, count: int,
                   min_side: int, max_side: int, quality: int) -> None:
    """Write ``count`` random variants of ``photo`` as ``class_dir/<stem>_<index>.jpg``."""
    class_dir.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        random_variant(photo, rng, min_side, max_side).save(class_dir / f"{stem}_{i:05d}.jpg", quality=quality)


def check_sizes(num_classes: int, per_class: tuple[int, ...], min_side: int, max_side: int) -> None:
    if not 1 <= num_classes <= len(SOURCE_PHOTOS):
        raise ValueError(f"num_classes must be in 1..{len(SOURCE_PHOTOS)}, got {num_classes}")
    if min(per_class) < 1 or not 0 < min_side <= max_side:
        raise ValueError(f"need images per class >= 1 and 0 < min_side <= max_side, got "
                         f"{per_class}, {min_side}, {max_side}")


def make_demo_image_folder(root: str | Path, images_per_class: int, seed: int = 0, min_side: int = 96,
                           max_side: int = 400, num_classes: int = len(SOURCE_PHOTOS), quality: int = 90) -> Path:
    """Write ``num_classes`` x ``images_per_class`` JPEGs under ``root`` (ImageFolder layout); returns root.

    Crops come from the whole photo. Both sides of every image are in [min_side, max_side] px.
    """
    check_sizes(num_classes, (images_per_class,), min_side, max_side)
    root = Path(root)
    for class_index, name in enumerate(SOURCE_PHOTOS[:num_classes]):
        write_variants(load_photo(name), np.random.default_rng([seed, class_index]), root / name, name,
                       images_per_class, min_side, max_side, quality)
    return root


def make_demo_splits(root: str | Path, train_per_class: int, held_out_per_class: int, seed: int = 0,
                     min_side: int = 96, max_side: int = 400, num_classes: int = len(SOURCE_PHOTOS),
                     quality: int = 90) -> DemoSplits:
    """Write a training set and a held-out set that share no source pixel (module docstring).

    ``root/train/<class>/<class>_train_<index>.jpg`` (``train_per_class`` per class, from the left half of
    each photo) and ``root/held_out/<class>/<class>_held_out_<index>.jpg`` (``held_out_per_class``, from
    the right half); file names differ by split, so shard keys (paths relative to each root) do too.
    Both sides of every image are in [min_side, max_side] px.
    """
    check_sizes(num_classes, (train_per_class, held_out_per_class), min_side, max_side)
    root = Path(root)
    splits = DemoSplits(train=root / "train", held_out=root / "held_out")
    counts = {"train": train_per_class, "held_out": held_out_per_class}
    for class_index, name in enumerate(SOURCE_PHOTOS[:num_classes]):
        photo = load_photo(name)
        for split, half in SPLIT_HALVES.items():
            rng = np.random.default_rng([seed, class_index, 1 + half])
            write_variants(photo_half(photo, half), rng, getattr(splits, split) / name, f"{name}_{split}",
                           counts[split], min_side, max_side, quality)
    return splits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output ImageFolder root (with --held-out-per-class: its parent)")
    parser.add_argument("--per-class", type=int, default=100, help="images per class (training images with "
                                                                   "--held-out-per-class)")
    parser.add_argument("--held-out-per-class", type=int, default=0,
                        help="also write this many held-out images per class: OUT/train and OUT/held_out")
    parser.add_argument("--classes", type=int, default=len(SOURCE_PHOTOS), help="number of classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-side", type=int, default=96, help="smallest longer side, px")
    parser.add_argument("--max-side", type=int, default=400, help="largest longer side, px")
    args = parser.parse_args(argv)
    sizes = dict(seed=args.seed, min_side=args.min_side, max_side=args.max_side, num_classes=args.classes)
    if args.held_out_per_class > 0:
        splits = make_demo_splits(args.out, args.per_class, args.held_out_per_class, **sizes)
        print(f"wrote {args.classes * args.per_class} training images under {splits.train} and "
              f"{args.classes * args.held_out_per_class} held-out images under {splits.held_out}")
        return 0
    root = make_demo_image_folder(args.out, args.per_class, **sizes)
    print(f"wrote {args.classes * args.per_class} images under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
