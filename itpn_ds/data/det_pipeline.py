"""Detection / instance segmentation loaders over detection shards, in torchvision's detection format.

Torch (PIL) only: each sample's instances are a variable-length record with masks that are decoded from
COCO RLE/polygons on the host anyway, so a DALI graph would only take over the JPEG decode and resize;
the loaders decode, resize and flip on a thread pool of ``num_threads``.

Training (:class:`DetTrainLoader`, the published configs' DETR-style recipe): the shorter side drawn from
``recipe.short_sides`` (480, 512, ..., 800), the longer side capped at ``recipe.max_long_side`` (1333),
keep ratio; horizontal flip with p 0.5. With probability ``recipe.crop_prob`` (published 0.5, mmdet's
``AutoAugment`` choosing between its two policies) the image is first resized to a shorter side of
``recipe.crop_short_sides`` (400, 500, 600), a random ``crop_size`` range (384-600 px, height and width
drawn apart, at most the image's) is cut from it at a random offset, and that crop is what gets the
multi-scale resize. Boxes cut by the crop are clipped to it and those left without area dropped with their
masks and labels (mmdet's ``RandomCrop``, ``allow_negative_crop``: a crop may keep no instance at all). All
draws come from (seed, key, epoch), so a resumed run replays them. The two resizes of the crop branch are
composed into one resample of the crop's region of the original image (:class:`SampleGeometry`), where
mmdet resamples twice. Crowd instances are dropped. Evaluation (:class:`DetEvalLoader`): shorter side 800
(long <= 1333), no flip, crowd instances kept (``iscrowd`` 1), fixed order.

Both yield :class:`DetectionBatch`: ``images`` a list of (3, H_i, W_i) float32 RGB in [0, 1] (torchvision's
detection models normalize and batch them themselves; configure their transform not to resize again)
and ``targets`` a list of dicts: ``boxes`` (N, 4) float32 xyxy in the resized image's pixels,
``labels`` (N,) int64 1..K (0 is the background), ``masks`` (N, H_i, W_i) uint8, ``iscrowd`` (N,)
int64, ``image_id`` () int64 (the annotation file's), ``orig_size`` and ``size`` (2,) int64 (h, w)
before and after the resize. The manifest's ``category_ids[label - 1]`` is the file's category id.
Boxes are scaled and flipped geometrically; masks are resized nearest (pixel-centre), so a mask's tight
box stays within 0.5 px of its box (1.5 px where downscaling skips a thin tip of the mask).
"""
from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from itpn_ds.data.annotations import DETECTION, instance_masks
from itpn_ds.data.seg_transforms import nearest_index
from itpn_ds.data.shard_loader import CorruptSampleError, EpochLoader, FixedPass
from itpn_ds.data.shards import ShardError
from itpn_ds.data.views import key_hash
from itpn_ds.errors import FieldError


@dataclass
class DetRecipe:
    """The training pipeline's recipe; the ``detect:`` section of a run (``DetectConfig``) is one.

    short_sides: the shorter sides (px) training draws from; max_long_side: cap of the longer side;
    flip_prob: horizontal flip probability; crop_prob: probability of the crop branch, which resizes to a
    shorter side of ``crop_short_sides`` (longer <= ``max_long_side``) and cuts a crop whose height and width
    are drawn from ``crop_size`` [min, max] px (each at most the resized image's) before the multi-scale resize.
    Out-of-range values are refused naming the field (``FieldError``).
    """

    short_sides: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    max_long_side: int = 1333
    flip_prob: float = 0.5
    crop_prob: float = 0.5
    crop_short_sides: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_size: list[int] = field(default_factory=lambda: [384, 600])

    def __post_init__(self) -> None:
        self.short_sides, self.crop_short_sides = list(self.short_sides), list(self.crop_short_sides)
        self.crop_size = list(self.crop_size)
        for key in ("short_sides", "crop_short_sides"):
            sides = getattr(self, key)
            if not sides or min(sides) < 1:
                raise FieldError(key, f"must be positive sizes in px, got {sides}")
        if self.max_long_side < 1:
            raise FieldError("max_long_side", f"must be a positive size in px, got {self.max_long_side}")
        for key in ("flip_prob", "crop_prob"):
            if not 0 <= getattr(self, key) <= 1:
                raise FieldError(key, f"must be in [0, 1], got {getattr(self, key)}")
        if len(self.crop_size) != 2 or not 1 <= self.crop_size[0] <= self.crop_size[1]:
            raise FieldError("crop_size", f"must be [min, max] px with 1 <= min <= max, got {self.crop_size}")


@dataclass(frozen=True)
class SampleGeometry:
    """Where one sample's pixels come from: the region ``crop`` (x0, y0, x1, y1) of the original image in its
    pixels (fractional where a crop was cut from a resized image; the whole image otherwise), resampled to
    ``size`` (w, h) px, then flipped horizontally when ``flip``; ``cropped``: instances cut away by the crop
    are dropped."""

    crop: tuple[float, float, float, float]
    size: tuple[int, int]
    flip: bool = False
    cropped: bool = False

    @classmethod
    def whole(cls, width: int, height: int, size: tuple[int, int], flip: bool = False) -> "SampleGeometry":
        return cls((0.0, 0.0, float(width), float(height)), size, flip)


@dataclass
class DetectionBatch:
    """One micro-batch of detection samples (module docstring); ``valid`` (B,) bool as in Batch."""

    images: list[torch.Tensor]
    targets: list[dict[str, torch.Tensor]]
    keys: list[str]
    valid: torch.Tensor

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "DetectionBatch":
        return replace(self, images=[i.to(device, non_blocking=non_blocking) for i in self.images],
                       targets=[{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in self.targets],
                       valid=self.valid.to(device, non_blocking=non_blocking))

    def for_model(self, device: torch.device | str, dtype: torch.dtype) -> "DetectionBatch":
        """On ``device``; the images stay fp32 whatever the model's ``dtype``: a detection model runs in fp32
        (its anchors, box decoding and NMS) and casts its backbone itself (``backbone_autocast``)."""
        return self.to(device)


def resized_size(width: int, height: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """(w, h) with the shorter side ``short_side`` unless that makes the longer exceed ``max_long_side``."""
    factor = min(short_side / min(width, height), max_long_side / max(width, height))
    return max(1, round(width * factor)), max(1, round(height * factor))


def crop_geometry(width: int, height: int, recipe: DetRecipe, short_side: int, flip: bool,
                  rng: np.random.Generator) -> SampleGeometry:
    """The crop branch of one sample (``DetRecipe``): resize to a drawn ``crop_short_sides`` entry, cut a crop
    of drawn height and width at a drawn offset (mmdet's ``RandomCrop``, ``absolute_range``), resize that crop
    to ``short_side``; the result as one region of the original image."""
    first = int(recipe.crop_short_sides[int(rng.integers(len(recipe.crop_short_sides)))])
    w1, h1 = resized_size(width, height, first, recipe.max_long_side)
    low, high = recipe.crop_size
    crop_h = int(rng.integers(min(h1, low), min(h1, high) + 1))
    crop_w = int(rng.integers(min(w1, low), min(w1, high) + 1))
    y = int(rng.integers(0, h1 - crop_h + 1))
    x = int(rng.integers(0, w1 - crop_w + 1))
    # in the original's px (products before the division: the far edge of a crop at the border is exactly
    # the image's, as PIL requires)
    region = (x * width / w1, y * height / h1, (x + crop_w) * width / w1, (y + crop_h) * height / h1)
    return SampleGeometry(region, resized_size(crop_w, crop_h, short_side, recipe.max_long_side), flip, cropped=True)


def transform_sample(image: Image.Image, record: dict, geometry: SampleGeometry,
                     keep_crowd: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One decoded image and its instance record -> (3, h, w) float image in [0, 1] and its target: the
    ``geometry.crop`` region resampled to ``geometry.size`` (w, h) (image bilinear, masks nearest, boxes
    clipped to the region and scaled), optionally flipped."""
    instances = [a for a in record["instances"] if keep_crowd or not a["iscrowd"]]
    width, height = image.size
    (x0, y0, x1, y1), size = geometry.crop, geometry.size
    boxes = np.array([a["bbox"] for a in instances], dtype=np.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    if geometry.cropped:
        boxes = np.clip(boxes - [x0, y0, x0, y0], 0.0, [x1 - x0, y1 - y0] * 2)
        kept = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, instances = boxes[kept], [a for a, k in zip(instances, kept) if k]
    boxes *= np.array([size[0] / (x1 - x0), size[1] / (y1 - y0)] * 2)
    masks = instance_masks(instances, height, width)
    rows = nearest_index(height, size[1], start=y0, extent=y1 - y0)
    cols = nearest_index(width, size[0], start=x0, extent=x1 - x0)
    masks = masks[:, rows[:, None], cols[None, :]]
    pixels = np.asarray(image.resize(size, Image.Resampling.BILINEAR, box=geometry.crop))  # whole: as box=None
    if geometry.flip:
        pixels, masks = pixels[:, ::-1], masks[:, :, ::-1]
        boxes[:, [0, 2]] = size[0] - boxes[:, [2, 0]]
    target = {"boxes": torch.from_numpy(boxes.astype(np.float32)),
              "labels": torch.tensor([a["label"] for a in instances], dtype=torch.int64),
              "masks": torch.from_numpy(np.ascontiguousarray(masks)),
              "iscrowd": torch.tensor([a["iscrowd"] for a in instances], dtype=torch.int64),
              "image_id": torch.tensor(record["image_id"], dtype=torch.int64),
              "orig_size": torch.tensor([height, width], dtype=torch.int64),
              "size": torch.tensor([size[1], size[0]], dtype=torch.int64)}
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0), target


class _DetectionLoader(EpochLoader):
    keep_crowd = False  # targets keep crowd instances (evaluation)

    def __init__(self, shards: str | Path, micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_threads: int = 2) -> None:
        super().__init__(shards, micro_batch, rank, world_size, seed)
        if self.manifest.kind != DETECTION:
            raise ShardError(f"{shards}: a {self.manifest.kind} shard directory, the detection loader needs one "
                             "written by `make-shards --kind detection`")
        self._pool = ThreadPoolExecutor(max_workers=max(1, num_threads), thread_name_prefix="detection")

    def sample_geometry(self, key: str, width: int, height: int) -> SampleGeometry:
        """Where the pixels of one sample in the current epoch come from."""
        raise NotImplementedError

    def _one(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        key = self.manifest.keys[index]
        try:
            image = Image.open(io.BytesIO(self.reader.encoded(index))).convert("RGB")
        except Exception as exc:  # PIL raises many types
            raise CorruptSampleError(f"sample {key!r} cannot be decoded: {exc}") from exc
        record = json.loads(self.reader.annotation(index))
        return transform_sample(image, record, self.sample_geometry(key, *image.size), self.keep_crowd)

    def _load(self, indices: np.ndarray, valid: np.ndarray) -> DetectionBatch:
        images, targets = zip(*self._pool.map(self._one, [int(i) for i in indices]))
        return DetectionBatch(list(images), list(targets), [self.manifest.keys[i] for i in indices],
                              torch.from_numpy(valid.copy()))


class DetTrainLoader(_DetectionLoader):
    """Multi-scale training batches (``recipe``)."""

    def __init__(self, shards: str | Path, micro_batch: int, recipe: DetRecipe | None = None, **kwargs) -> None:
        super().__init__(shards, micro_batch, **kwargs)
        self.recipe = recipe or DetRecipe()

    def sample_geometry(self, key: str, width: int, height: int) -> SampleGeometry:
        recipe = self.recipe
        rng = np.random.default_rng(key_hash("detection", self.seed, key, self.epoch))
        short = int(recipe.short_sides[int(rng.integers(len(recipe.short_sides)))])
        flip = bool(rng.random() < recipe.flip_prob)
        if recipe.crop_prob > 0 and rng.random() < recipe.crop_prob:
            return crop_geometry(width, height, recipe, short, flip, rng)
        return SampleGeometry.whole(width, height, resized_size(width, height, short, recipe.max_long_side), flip)


class DetEvalLoader(FixedPass, _DetectionLoader):
    """Evaluation batches: shorter side ``short_side`` (longer <= ``max_long_side``), crowd kept, fixed order."""

    keep_crowd = True

    def __init__(self, shards: str | Path, micro_batch: int, short_side: int = 800, max_long_side: int = 1333,
                 **kwargs) -> None:
        super().__init__(shards, micro_batch, **kwargs)
        self.short_side, self.max_long_side = short_side, max_long_side

    def sample_geometry(self, key: str, width: int, height: int) -> SampleGeometry:
        return SampleGeometry.whole(width, height, resized_size(width, height, self.short_side, self.max_long_side))

