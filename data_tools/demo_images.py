"""A small, real, deterministic image set for tests, demos and benchmarks.

Colour photos shipped inside scikit-image (one class per photo) are cropped at random boxes and
rescaled to varied sizes (some non-square), then written as an ImageFolder tree
``root/<class>/<class>_<index>.jpg``. The same (images_per_class, seed, sizes, classes) always gives
the same pixels, so benchmarks and tests are repeatable without any download.

CLI: ``python -m data_tools.demo_images OUT --per-class N``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# skimage.data functions returning (H, W, 3) uint8 colour photos that need no optional download.
SOURCE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                 "immunohistochemistry", "retina", "stereo_motorcycle")


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


def make_demo_image_folder(root: str | Path, images_per_class: int, seed: int = 0, min_side: int = 96,
                           max_side: int = 400, num_classes: int = len(SOURCE_PHOTOS), quality: int = 90) -> Path:
    """Write ``num_classes`` x ``images_per_class`` JPEGs under ``root`` (ImageFolder layout); returns root.

    Both sides of every image are in [min_side, max_side] px.
    """
    if not 1 <= num_classes <= len(SOURCE_PHOTOS):
        raise ValueError(f"num_classes must be in 1..{len(SOURCE_PHOTOS)}, got {num_classes}")
    if images_per_class < 1 or not 0 < min_side <= max_side:
        raise ValueError(f"need images_per_class >= 1 and 0 < min_side <= max_side, got "
                         f"{images_per_class}, {min_side}, {max_side}")
    root = Path(root)
    for class_index, name in enumerate(SOURCE_PHOTOS[:num_classes]):
        photo = load_photo(name)
        rng = np.random.default_rng([seed, class_index])
        class_dir = root / name
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            image = random_variant(photo, rng, min_side, max_side)
            image.save(class_dir / f"{name}_{i:05d}.jpg", quality=quality)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output ImageFolder root")
    parser.add_argument("--per-class", type=int, default=100, help="images per class")
    parser.add_argument("--classes", type=int, default=len(SOURCE_PHOTOS), help="number of classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-side", type=int, default=96, help="smallest longer side, px")
    parser.add_argument("--max-side", type=int, default=400, help="largest longer side, px")
    args = parser.parse_args(argv)
    root = make_demo_image_folder(args.out, args.per_class, seed=args.seed, min_side=args.min_side,
                                  max_side=args.max_side, num_classes=args.classes)
    print(f"wrote {args.classes * args.per_class} images under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
