"""Patch masks for masked image modeling, deterministic from (seed, epoch, sample index).

* :class:`BlockMaskGenerator`: BEiT-style block-wise masking (iTPN's CLIP objective): rectangles of at
  least ``min_block`` patches with aspect ratio in [aspect, 1/aspect] are added until the target count
  is reached (a block never adds more than the patches still missing); then the mask is topped up at
random so it holds EXACTLY ``num_masked`` patches
  (every sample in a batch masks the same number, as the model's batched gather needs).
* :class:`RandomMaskGenerator`: MAE-style uniform random masking (the pixel objective).

Both hand the loaders ``batch(seed, epoch, indices) -> (B, N) bool``.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from itpn_ds.data.views import key_hash


@dataclass(frozen=True)
class BlockMaskGenerator:
    """Block masks on a ``height`` x ``width`` patch grid.

    num_masked: patches to mask (default: 75 of 196 scaled to the grid, i.e. ~38%).
    min_block:  smallest block in patches (scaled down for grids smaller than 14 x 14).
    max_block:  largest block in patches (None: no limit beyond ``num_masked``).
    aspect:     block aspect ratios are log-uniform in [aspect, 1 / aspect].
    """

    height: int
    width: int
    num_masked: int | None = None
    min_block: int = 16
    max_block: int | None = None
    aspect: float = 0.3

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"mask grid must be at least 1x1, got {self.height}x{self.width}")
        if not 0 < self.aspect <= 1:
            raise ValueError(f"aspect must be in (0, 1], got {self.aspect}")
        if not 0 <= self.masked_count <= self.num_patches:
            raise ValueError(f"num_masked {self.num_masked} outside 0..{self.num_patches}")

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    @property
    def masked_count(self) -> int:
        if self.num_masked is not None:
            return self.num_masked
        return round(self.num_patches * 75 / 196)

    @property
    def block_min(self) -> int:
        """``min_block`` scaled by the grid's size relative to 14 x 14 (at least 1)."""
        return max(1, min(self.min_block, round(self.min_block * self.num_patches / 196)))

    def __call__(self, rng: random.Random) -> np.ndarray:
        """(height, width) bool mask with exactly ``masked_count`` True (= masked) patches."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        target, count, stalls = self.masked_count, 0, 0
        while count < target and stalls < 10:
            added = self._add_block(mask, target - count, rng)
            count += added
            stalls = stalls + 1 if added == 0 else 0
        return _fix_count(mask, count, target, rng)

    def _add_block(self, mask: np.ndarray, remaining: int, rng: random.Random) -> int:
        """Try up to 10 times to mask one new block of at most ``remaining`` new patches; returns the count."""
        max_block = remaining if self.max_block is None else min(remaining, self.max_block)
        min_block = min(self.block_min, max_block)
        log_aspect = (math.log(self.aspect), -math.log(self.aspect))
        for _ in range(10):
            area = rng.uniform(min_block, max_block)
            ratio = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * ratio)))
            w = int(round(math.sqrt(area / ratio)))
            if 0 < h < self.height and 0 < w < self.width:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                region = mask[top:top + h, left:left + w]
                new = h * w - int(region.sum())
                if 0 < new <= max_block:
                    region[...] = True
                    return new
        return 0

    def batch(self, seed: int, epoch: int, indices: list[int] | np.ndarray) -> torch.Tensor:
        """(B, height * width) bool masks for the given global sample indices in an epoch."""
        masks = [self(mask_rng(seed, epoch, int(i))).reshape(-1) for i in indices]
        return torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, self.num_patches, dtype=torch.bool)


def _fix_count(mask: np.ndarray, count: int, target: int, rng: random.Random) -> np.ndarray:
    """Mask random unmasked patches so exactly ``target`` of them are masked (``count`` <= target now)."""
    if count < target:
        flat = mask.reshape(-1)
        flat[rng.sample(np.flatnonzero(~flat).tolist(), target - count)] = True
    return mask


def mask_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of one sample's mask: a function of (seed, epoch, global sample index) only.
    (Python's Mersenne Twister: scalar draws are ~20x cheaper than numpy's, see benchmarks/masking.py.)"""
    return random.Random(key_hash("mask", seed, epoch, index))


@dataclass(frozen=True)
class RandomMaskGenerator:
    """MAE-style masks for the pixel objective: ``num_patches - int(num_patches * (1 - mask_ratio))``
    patches chosen uniformly at random per sample (every sample masks the same count)."""

    num_patches: int
    mask_ratio: float = 0.75

    def __post_init__(self) -> None:
        if self.num_patches < 1:
            raise ValueError(f"num_patches must be >= 1, got {self.num_patches}")
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")

    @property
    def masked_count(self) -> int:
        return self.num_patches - int(self.num_patches * (1 - self.mask_ratio))

    def batch(self, seed: int, epoch: int, indices: list[int] | np.ndarray) -> torch.Tensor:
        """(B, num_patches) bool masks (True = masked) for the given global sample indices in an epoch."""
        masks = np.zeros((len(indices), self.num_patches), dtype=bool)
        for row, index in zip(masks, indices):
            row[mask_rng(seed, epoch, int(index)).sample(range(self.num_patches), self.masked_count)] = True
        return torch.from_numpy(masks)
