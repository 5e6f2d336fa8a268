"""The mmseg ADE20K training recipe as per-sample plans drawn on the host, and the label side of it.

mmseg's pipeline (``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)``,
``RandomCrop(512, cat_max_ratio=0.75)``, ``RandomFlip(0.5)``, ``PhotoMetricDistortion``, normalize, pad to the
crop with 0 / label 255) is split in two:

* :func:`train_plan` draws one sample's :class:`SegPlan` from ``hash(seed, key, epoch)`` in mmseg's order
  (resize ratio, crop offsets, flip, photometric draws), so a resumed run replays it exactly. The crop's
  category check needs the label map, which the host decodes anyway: up to 10 re-draws while the crop's
  most frequent class (ignore index excluded) covers ``cat_max_ratio`` or more of its labelled pixels,
  or it holds fewer than two classes; after 10, the 11th draw is taken unchecked, as mmseg does.
* The label map is transformed here (:func:`plan_labels`: nearest resize, crop, flip, pad 255) and the
  image by the decoders (``seg_pipeline``: DALI or PIL), both with the pixel-centre convention
  (source pixel ``floor((i + 0.5) * in / out)``), so label and colour stay on the same pixels. Only the
  crop window of the label map is resampled.

Photometric distortion (:class:`Photometric`): mmseg's four ops with its draws: brightness ``+U(-32, 32)``
(p 0.5), contrast ``x U(0.5, 1.5)`` (p 0.5, before or after the colour ops with p 0.5 each),
saturation ``x U(0.5, 1.5)`` (p 0.5), hue ``+ randint(-18, 18)`` OpenCV units = 2 degrees each (p 0.5).
Differences from mmseg, for both backends alike: saturation and hue are one linear map in YIQ space (DALI's
``fn.hsv``; :func:`hsv_yiq` is its numpy twin) instead of OpenCV's HSV round trip, and each op rounds to
uint8 where mmseg truncates (within one level).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from itpn_ds.data.annotations import IGNORE_INDEX
from itpn_ds.data.views import key_hash
from itpn_ds.errors import FieldError

ADE20K_SCALE = (2048, 512)  # (long, short) edge bounds of the keep-ratio rescale, train and test
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


@dataclass
class SegRecipe:
    """The training pipeline's recipe; the ``segment:`` section of a run (``SegmentConfig``) is one.

    crop_size: (h, w) px of the training crop (mmseg 512 x 512). scale: (long, short) edge bounds of the
    keep-ratio rescale before ``ratio_range`` scales them. cat_max_ratio: 1 disables the category check.
    flip_prob: horizontal flip probability. photometric: apply PhotoMetricDistortion. Out-of-range values are
    refused naming the field (``FieldError``).
    """

    crop_size: tuple[int, int] = (512, 512)
    scale: tuple[int, int] = ADE20K_SCALE
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True

    def __post_init__(self) -> None:
        for key in ("crop_size", "scale", "ratio_range"):
            value = tuple(getattr(self, key))
            setattr(self, key, value)
            if len(value) != 2 or not min(value) > 0:
                raise FieldError(key, f"must be two positive numbers, got {list(value)}")
        if not self.ratio_range[0] <= self.ratio_range[1]:
            raise FieldError("ratio_range", f"must be [low, high] with low <= high, got {list(self.ratio_range)}")
        if not 0 < self.cat_max_ratio <= 1:
            raise FieldError("cat_max_ratio", f"must be in (0, 1] (1: no category check), got {self.cat_max_ratio}")


@dataclass(frozen=True)
class Photometric:
    """One sample's PhotoMetricDistortion: brightness shift (uint8 levels), contrast factor, whether the
    contrast comes before the colour ops, saturation factor and hue shift (degrees). Defaults: none."""

    brightness: float = 0.0
    contrast: float = 1.0
    contrast_first: bool = True
    saturation: float = 1.0
    hue: float = 0.0

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Photometric":
        """mmseg's draws in mmseg's order (each op on with probability 0.5)."""
        brightness = rng.uniform(-32, 32) if rng.integers(2) else 0.0
        contrast_first = bool(rng.integers(2))
        contrast = rng.uniform(0.5, 1.5) if contrast_first and rng.integers(2) else 1.0
        saturation = rng.uniform(0.5, 1.5) if rng.integers(2) else 1.0
        hue = 2.0 * float(rng.integers(-18, 18)) if rng.integers(2) else 0.0
        if not contrast_first and rng.integers(2):
            contrast = rng.uniform(0.5, 1.5)
        return cls(float(brightness), float(contrast), contrast_first, float(saturation), hue)


NO_PHOTOMETRIC = Photometric()


@dataclass(frozen=True)
class SegPlan:
    """One sample in one epoch. size: (w, h) after the rescale; box: (x, y, w, h) of the crop in the
    rescaled image (at most the crop size; smaller images are padded after it); crop_tries: crops drawn
    (1 + re-draws; 11 = the unchecked last draw)."""

    size: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool = False
    photometric: Photometric = NO_PHOTOMETRIC
    crop_tries: int = 1


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(w, h) of mmcv's keep-ratio rescale: the largest size with long edge <= max(scale) and short edge
    <= min(scale), rounded half up."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def nearest_index(source: int, target: int, start: float = 0.0, extent: float | None = None) -> np.ndarray:
    """(target,) source index of each output pixel of a nearest resize of the source span [start, start +
    extent) (default: all ``source`` pixels) to ``target`` pixels, pixel-centre convention."""
    extent = source if extent is None else extent
    return np.clip((start + (np.arange(target) + 0.5) * (extent / target)).astype(np.int64), 0, source - 1)


def crop_labels(labels: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """The ``box`` (x, y, w, h) of ``labels`` (H, W) nearest-resized to ``size`` (w, h), resampling only
    the box: (h, w) of the same dtype."""
    x, y, w, h = box
    rows = nearest_index(labels.shape[0], size[1])[y:y + h]
    cols = nearest_index(labels.shape[1], size[0])[x:x + w]
    return labels[rows[:, None], cols[None, :]]


def category_ratio_ok(crop: np.ndarray, cat_max_ratio: float, ignore_index: int) -> bool:
    """mmseg's test: at least two classes, and the most frequent under ``cat_max_ratio`` of the
    labelled (non-ignored) pixels."""
    counts = np.bincount(crop.ravel(), minlength=256)
    counts[ignore_index] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def train_plan(seed: int, key: str, epoch: int, labels: np.ndarray, recipe: SegRecipe,
               ignore_index: int = IGNORE_INDEX) -> SegPlan:
    """A training sample's plan from (seed, key, epoch) and its label map (H, W) of training ids, ``ignore_index``
    (the shards') left out of the category check."""
    rng = np.random.default_rng(key_hash("segmentation", seed, key, epoch))
    height, width = labels.shape
    ratio = rng.uniform(*recipe.ratio_range)
    size = rescale_size(width, height, (int(recipe.scale[0] * ratio), int(recipe.scale[1] * ratio)))
    crop_h, crop_w = min(recipe.crop_size[0], size[1]), min(recipe.crop_size[1], size[0])

    def draw_box() -> tuple[int, int, int, int]:
        y = int(rng.integers(0, size[1] - crop_h + 1))
        x = int(rng.integers(0, size[0] - crop_w + 1))
        return x, y, crop_w, crop_h

    box, tries = draw_box(), 1
    if recipe.cat_max_ratio < 1:
        while tries <= 10 and not category_ratio_ok(crop_labels(labels, size, box), recipe.cat_max_ratio,
                                                    ignore_index):
            box, tries = draw_box(), tries + 1
    flip = bool(rng.random() < recipe.flip_prob)
    photometric = Photometric.draw(rng) if recipe.photometric else NO_PHOTOMETRIC
    return SegPlan(size, box, flip, photometric, tries)


def eval_plan(width: int, height: int, scale: tuple[int, int] = ADE20K_SCALE) -> SegPlan:
    """The test transform: the whole image rescaled (keep ratio) to ``scale``; no crop, flip or colour."""
    size = rescale_size(width, height, scale)
    return SegPlan(size, (0, 0, *size))


def plan_labels(labels: np.ndarray, plan: SegPlan, pad_to: tuple[int, int], ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """The label side of a training plan: (H, W) training ids -> crop of the nearest resize, flipped,
    padded at the bottom/right with ``ignore_index`` to ``pad_to`` (h, w): int64."""
    crop = crop_labels(labels, plan.size, plan.box)
    if plan.flip:
        crop = crop[:, ::-1]
    out = np.full(pad_to, ignore_index, dtype=np.int64)
    out[: crop.shape[0], : crop.shape[1]] = crop
    return out


def hsv_yiq_matrix(hue: float, saturation: float) -> np.ndarray:
    """(3, 3) RGB -> RGB map of a hue rotation (degrees) and a saturation scale in YIQ space."""
    angle = -math.radians(hue)  # DALI's direction of rotation
    rotate = np.array([[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]])
    return _YIQ_TO_RGB @ np.diag([1.0, saturation, saturation]) @ rotate @ _RGB_TO_YIQ


def _round_clip(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255)


def hsv_yiq(image: np.ndarray, hue: float, saturation: float) -> np.ndarray:
    """Hue/saturation of a float (H, W, 3) RGB image in uint8 levels, rounded and clipped."""
    return _round_clip(image @ hsv_yiq_matrix(hue, saturation).T.astype(np.float32))


def photometric_numpy(image: np.ndarray, p: Photometric) -> np.ndarray:
    """PhotoMetricDistortion (the DALI graph's ops, same order and rounding) on (H, W, 3) uint8 RGB."""
    x = image.astype(np.float32)
    if p.brightness:
        x = _round_clip(x + p.brightness)
    if p.contrast_first and p.contrast != 1:
        x = _round_clip(x * p.contrast)
    if p.hue or p.saturation != 1:
        x = hsv_yiq(x, p.hue, p.saturation)
    if not p.contrast_first and p.contrast != 1:
        x = _round_clip(x * p.contrast)
    return x.astype(np.uint8)
