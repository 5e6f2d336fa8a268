"""Augmentation views: a crop box in the original image's pixels, a horizontal flip and colour-jitter factors.

A view is drawn deterministically from (seed, sample key, view id) with torchvision's RandomResizedCrop
algorithm (box and flip) and torchvision's ColorJitter ranges (factors, ``color_jitter``), so the
teacher-extraction job and the pre-training pipeline agree on it without talking: the extraction job
stores the view it used, and the pipeline replays it (``ViewSource``).

Without a teacher cache, the pipeline draws a fresh view per epoch with ``view_id = epoch``
(``SampledViews``).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from itpn_ds.data.color_jitter import NO_JITTER, JitterFactors

DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class CropView:
    """Crop box (x, y = top-left corner; w, h = size; all in source-image pixels), a flip flag and the
    colour-jitter factors the decoders apply to the box before resizing it (default: none)."""

    x: int
    y: int
    w: int
    h: int
    flip: bool
    jitter: JitterFactors = NO_JITTER

    def box(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.w, self.h)


def key_hash(*parts: object) -> int:
    """A stable 64-bit hash of the parts (independent of Python's per-process hash seed)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample_view(seed: int, key: str, view_id: int, width: int, height: int,
                scale: tuple[float, float] = DEFAULT_SCALE, ratio: tuple[float, float] = DEFAULT_RATIO,
                flip_prob: float = 0.5, color_jitter: float = 0.0) -> CropView:
    """RandomResizedCrop box + flip + colour-jitter factors for one (seed, key, view id) on a ``width`` x
    ``height`` image.

    Same algorithm as ``torchvision.transforms.RandomResizedCrop.get_params``: up to 10 tries at a random
    area fraction in ``scale`` and log-uniform aspect ratio in ``ratio``; otherwise a center crop with the
    aspect ratio clamped into ``ratio``. The jitter factors (strength ``color_jitter``, 0: none) come from
    a stream of their own, so the box and flip of a (seed, key, view id) do not depend on the strength.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"sample {key!r}: image size must be positive, got {width}x{height}")
    jitter = JitterFactors.draw(np.random.default_rng(key_hash("color-jitter", seed, key, view_id)), color_jitter)
    rng = np.random.default_rng(key_hash("view", seed, key, view_id))
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    flip = bool(rng.random() < flip_prob)
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            return CropView(x, y, w, h, flip, jitter)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return CropView((width - w) // 2, (height - h) // 2, w, h, flip, jitter)


def view_for_epoch(seed: int, key: str, epoch: int, num_views: int) -> int:
    """Which of the ``num_views`` cached views a sample uses in an epoch: hash(seed, key, epoch) mod K."""
    return key_hash("epoch-view", seed, key, epoch) % num_views


class ViewSource(Protocol):
    """Where the pre-training pipeline gets each sample's view (and, from a cache, its teacher targets).

    ``color_jitter`` is the strength the views' jitter factors were drawn with (0: the views carry none, and
    the decoder is built without the jitter ops)."""

    color_jitter: float

    def views(self, keys: Sequence[str], sizes: Sequence[tuple[int, int]], epoch: int) -> list[tuple[int, CropView]]:
        """(view id, view) per sample; ``sizes`` are the source images' (width, height)."""
        ...

    def targets(self, keys: Sequence[str], view_ids: Sequence[int]) -> torch.Tensor | None:
        """Teacher targets (B, T, D) float32 for those views, or None when there is no cache."""
        ...


@dataclass(frozen=True)
class SampledViews:
    """No cache: a fresh RandomResizedCrop view (+ colour jitter of strength ``color_jitter``) per
    (sample, epoch)."""

    seed: int
    scale: tuple[float, float] = DEFAULT_SCALE
    ratio: tuple[float, float] = DEFAULT_RATIO
    color_jitter: float = 0.0

    def views(self, keys: Sequence[str], sizes: Sequence[tuple[int, int]], epoch: int) -> list[tuple[int, CropView]]:
        return [(epoch, sample_view(self.seed, k, epoch, w, h, self.scale, self.ratio, color_jitter=self.color_jitter))
                for k, (w, h) in zip(keys, sizes)]

    def targets(self, keys: Sequence[str], view_ids: Sequence[int]) -> None:
        return None
