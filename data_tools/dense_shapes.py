"""A small synthetic dense data set with known answers: coloured shapes on real photo backgrounds.

Each image is a random crop of one of scikit-image's photos (``demo_images.SOURCE_PHOTOS``; training images
from the left half of each photo, validation images from the right half, so the splits share no
background pixel) rescaled to a random non-square size, with 1..``max_shapes`` shapes painted on it. A
shape's class is its form (``SHAPES``: circle, axis-aligned rectangle, rotated triangle, rotated hexagon);
its fill is the class colour (``CLASS_COLOURS``) shifted per instance and textured by per-pixel noise.
Shapes may overlap; a placement is redrawn when it would hide more than half of an earlier shape (or
leave it under ``MIN_VISIBLE`` px), so every instance's visible mask is its answer. Both formats hold the
same images and the same answers:

```
OUT/images/{training,validation}/shapes_NNNNN.jpg
OUT/annotations/{training,validation}/shapes_NNNNN.png   label map: 0 background, 1..K shape classes
OUT/instances_{training,validation}.json                 COCO: bbox xywh = tight box of the visible mask,
                                                         segmentation = compressed RLE, categories 1..K
OUT/class_names.txt                                      the K shape names (labels 1..K)
```

The label maps follow ADE20K's convention (0 = no class), so segmentation shards use
``--reduce-zero-label`` (K classes, background ignored) or a names file with ``background`` first (K + 1
classes). The same (counts, seed, sizes) always gives the same files; each image depends only on
(seed, split, index).

CLI: ``itpn-ds make-dense-shapes OUT --train N --val M [--seed S] [--min-side PX] [--max-side PX]``.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_tools.demo_images import SOURCE_PHOTOS, SPLIT_HALVES, load_photo, photo_half
from itpn_ds.data.annotations import encode_mask, mask_box
from itpn_ds.errors import UserError

SHAPES = ("circle", "rectangle", "triangle", "hexagon")  # label k + 1
CLASS_COLOURS = ((220, 40, 40), (40, 80, 220), (230, 200, 30), (40, 180, 70))
COLOUR_SHIFT = 24      # per-instance shift of each channel, uniform in [-COLOUR_SHIFT, COLOUR_SHIFT]
TEXTURE_NOISE = 6.0    # per-pixel Gaussian noise of the fill (std, uint8 levels)
MIN_VISIBLE = 48       # px an instance keeps visible
SPLITS = {"training": "train", "validation": "held_out"}  # split -> half of the photos (demo_images)


@dataclass(frozen=True)
class DenseShapes:
    """Where ``make_dense_shapes`` wrote a data set (``split``: ``training`` or ``validation``)."""

    root: Path

    def images(self, split: str) -> Path:
        return self.root / "images" / split

    def annotations(self, split: str) -> Path:
        return self.root / "annotations" / split

    def coco(self, split: str) -> Path:
        return self.root / f"instances_{split}.json"

    @property
    def class_names(self) -> Path:
        return self.root / "class_names.txt"


@dataclass(frozen=True)
class Scene:
    """One generated image and its answers: (H, W, 3) uint8 pixels, (H, W) uint8 label map and per
    instance its label (1..K) and visible (H, W) bool mask."""

    image: np.ndarray
    label_map: np.ndarray
    labels: list[int]
    masks: list[np.ndarray]


def shape_mask(label: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) bool mask of one random shape of class ``label`` (1..K), its size 8-25 % of the shorter side
    as radius, wholly inside the image."""
    radius = rng.uniform(0.08, 0.25) * min(width, height)
    cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    name = SHAPES[label - 1]
    if name == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
    elif name == "rectangle":
        aspect = rng.uniform(0.5, 1.0)
        half_w, half_h = (radius, radius * aspect) if rng.random() < 0.5 else (radius * aspect, radius)
        draw.rectangle((cx - half_w, cy - half_h, cx + half_w, cy + half_h), fill=1)
    else:
        corners = 3 if name == "triangle" else 6
        start = rng.uniform(0, 2 * math.pi)
        draw.polygon([(cx + radius * math.cos(start + 2 * math.pi * k / corners),
                       cy + radius * math.sin(start + 2 * math.pi * k / corners)) for k in range(corners)], fill=1)
    return np.asarray(canvas, dtype=bool)


def place_shapes(width: int, height: int, count: int, rng: np.random.Generator) -> tuple[list[int], list[np.ndarray]]:
    """Up to ``count`` shapes, later ones on top: (labels, visible masks). A candidate that would leave an
    earlier shape less than half visible or under MIN_VISIBLE px is redrawn (10 tries, then dropped)."""
    labels: list[int] = []
    full: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    for _ in range(count):
        for _ in range(10):
            label = int(rng.integers(1, len(SHAPES) + 1))
            mask = shape_mask(label, width, height, rng)
            kept = [v & ~mask for v in visible]
            if all(k.sum() >= max(MIN_VISIBLE, 0.5 * f.sum()) for k, f in zip(kept, full)) and mask.sum() >= MIN_VISIBLE:
                labels.append(label)
                full.append(mask)
                visible = kept + [mask]
                break
    return labels, visible


def background(photo: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of ``photo`` (40-100 % of the largest box of the target aspect) resized to
    ``width`` x ``height``: (H, W, 3) uint8."""
    ph, pw = photo.shape[:2]
    scale = rng.uniform(0.4, 1.0) * min(pw / width, ph / height)
    crop_w, crop_h = max(1, int(width * scale)), max(1, int(height * scale))
    x, y = int(rng.integers(0, pw - crop_w + 1)), int(rng.integers(0, ph - crop_h + 1))
    crop = Image.fromarray(photo[y:y + crop_h, x:x + crop_w]).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(crop)


def render_scene(photos: list[np.ndarray], rng: np.random.Generator, min_side: int, max_side: int,
                 max_shapes: int) -> Scene:
    """One image: size, background photo, shapes and their fills drawn from ``rng``."""
    width, height = (int(rng.integers(min_side, max_side + 1)) for _ in range(2))
    image = background(photos[int(rng.integers(len(photos)))], width, height, rng).astype(np.float32)
    labels, masks = place_shapes(width, height, int(rng.integers(1, max_shapes + 1)), rng)
    label_map = np.zeros((height, width), dtype=np.uint8)
    for label, mask in zip(labels, masks):
        colour = np.array(CLASS_COLOURS[label - 1]) + rng.uniform(-COLOUR_SHIFT, COLOUR_SHIFT, 3)
        image[mask] = colour + rng.normal(0, TEXTURE_NOISE, (int(mask.sum()), 3))
        label_map[mask] = label
    return Scene(np.clip(np.rint(image), 0, 255).astype(np.uint8), label_map, labels, masks)


def write_split(out: DenseShapes, split: str, count: int, photos: list[np.ndarray], seed: int, min_side: int,
                max_side: int, max_shapes: int, quality: int) -> None:
    """``count`` scenes of ``split`` on the given photo halves as JPEG + PNG label map + one COCO file."""
    half = SPLIT_HALVES[SPLITS[split]]
    photos = [photo_half(photo, half) for photo in photos]
    out.images(split).mkdir(parents=True, exist_ok=True)
    out.annotations(split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        scene = render_scene(photos, np.random.default_rng([seed, half, index]), min_side, max_side, max_shapes)
        name = f"shapes_{index:05d}"
        Image.fromarray(scene.image).save(out.images(split) / f"{name}.jpg", quality=quality)
        Image.fromarray(scene.label_map, mode="L").save(out.annotations(split) / f"{name}.png")
        height, width = scene.label_map.shape
        images.append({"id": index + 1, "file_name": f"{name}.jpg", "width": width, "height": height})
        for label, mask in zip(scene.labels, scene.masks):
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": label,
                                "bbox": mask_box(mask), "area": float(mask.sum()), "iscrowd": 0,
                                "segmentation": encode_mask(mask)})
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPES)]
    out.coco(split).write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def make_dense_shapes(root: str | Path, num_train: int, num_val: int, seed: int = 0, min_side: int = 96,
                      max_side: int = 320, max_shapes: int = 4, quality: int = 92) -> DenseShapes:
    """Write the training and validation splits under ``root`` (module docstring); returns the layout."""
    if num_train < 1 or num_val < 0 or max_shapes < 1 or not 32 <= min_side <= max_side:
        raise UserError(f"need --train >= 1, --val >= 0, --max-shapes >= 1 and 32 <= min side <= max side, got "
                         f"{num_train}, {num_val}, {max_shapes}, {min_side}, {max_side}")
    out = DenseShapes(Path(root))
    out.root.mkdir(parents=True, exist_ok=True)
    out.class_names.write_text("".join(f"{name}\n" for name in SHAPES))
    photos = [load_photo(name) for name in SOURCE_PHOTOS]
    for split, count in (("training", num_train), ("validation", num_val)):
        write_split(out, split, count, photos, seed, min_side, max_side, max_shapes, quality)
    return out


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("out", type=Path, help="output root (images/, annotations/, instances_*.json)")
    parser.add_argument("--train", type=int, default=200, help="training images")
    parser.add_argument("--val", type=int, default=50, help="validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-side", type=int, default=96, help="smallest side, px")
    parser.add_argument("--max-side", type=int, default=320, help="largest side, px")
    parser.add_argument("--max-shapes", type=int, default=4, help="most shapes per image")


def main(args: argparse.Namespace) -> int:
    out = make_dense_shapes(args.out, args.train, args.val, args.seed, args.min_side, args.max_side,
                            args.max_shapes)
    print(f"wrote {args.train} training and {args.val} validation images with label maps and COCO instances "
          f"under {out.root}")
    return 0
