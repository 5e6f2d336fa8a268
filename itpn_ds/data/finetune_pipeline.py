"""Fine-tuning train loader: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) + flip, RandAugment and
random erasing, all drawn from (seed, sample key, epoch) (``views.sample_view``, ``augment``), so a
resumed run replays them exactly. The box is decoded box-only and resized bicubic, RandAugment runs on
the resized uint8 image (DALI's ops in the decode graph; the same ops in PIL with ``backend="torch"``),
then flip, ImageNet normalization and random erasing (per-pixel noise) on the normalized batch.
Mixup/cutmix/label smoothing are applied by the engine (timm's ``Mixup``, see ``build_mixup``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from itpn_ds.data.augment import RandAugment, RandomErasing
from itpn_ds.data.batch import Batch
from itpn_ds.data.shard_loader import ShardLoader, student_output
from itpn_ds.data.views import CropView, sample_view


class FinetuneLoader(ShardLoader):
    """rand_augment_ops / rand_augment_magnitude: RandAugment n and m (0 ops: off, default n=2, m=9 of 30
    as ``rand-m9``). reprob: probability of random erasing per image (0: off)."""

    def __init__(self, shards: str | Path, micro_batch: int, img_size: int = 224, rand_augment_ops: int = 2,
                 rand_augment_magnitude: int = 9, reprob: float = 0.25, normalize: str = "imagenet", **kwargs) -> None:
        augment = RandAugment(rand_augment_ops, rand_augment_magnitude) if rand_augment_ops > 0 else None
        super().__init__(shards, [student_output(img_size, normalize)], micro_batch, augment=augment, **kwargs)
        self.erasing = RandomErasing(reprob) if reprob > 0 else None

    def views(self, keys: list[str], sizes: list[tuple[int, int]], indices: np.ndarray) -> tuple[list[int], list[CropView]]:
        return [self.epoch] * len(keys), [sample_view(self.seed, k, self.epoch, w, h) for k, (w, h) in zip(keys, sizes)]

    def make_batch(self, keys: list[str], indices: np.ndarray, view_ids: list[int], outputs: list[torch.Tensor],
                   valid: torch.Tensor) -> Batch:
        images = outputs[0]
        if self.erasing is not None:
            images = self.erasing(images, self.seed, keys, self.epoch)
        labels = torch.tensor([self.manifest.labels[i] for i in indices], dtype=torch.int64)
        return Batch(images=images, keys=keys, labels=labels, valid=valid)
