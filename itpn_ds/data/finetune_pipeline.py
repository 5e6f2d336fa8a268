"""Fine-tuning train loader: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) + flip per (seed, key, epoch),
decoded box-only and resized bicubic, RandAugment (DALI ``auto_aug.rand_augment`` in the decode graph;
timm's on PIL images with ``backend="torch"``),
ImageNet normalization, then random erasing (timm's ``RandomErasing``, per-pixel noise) on the batch.
Mixup/cutmix/label smoothing are applied by the engine (timm's ``Mixup``, see ``build_mixup``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from itpn_ds.data.batch import Batch
from itpn_ds.data.shard_loader import ShardLoader, student_output
from itpn_ds.data.torch_loader import rand_augment_pil
from itpn_ds.data.views import CropView, sample_view


def rand_augment_graph(num_ops: int, magnitude: int):
    """A ViewDecoder ``augment`` applying DALI's RandAugment (``num_ops`` ops at ``magnitude`` of 30)."""
    from nvidia.dali.auto_aug import rand_augment

    def augment(images):
        return rand_augment.rand_augment(images, n=num_ops, m=magnitude)

    return augment


class FinetuneLoader(ShardLoader):
    """rand_augment_ops / rand_augment_magnitude: RandAugment n and m (0 ops: off, default n=2, m=9 as
    ``rand-m9``). reprob: probability of random erasing per image (0: off)."""

    def __init__(self, shards: str | Path, micro_batch: int, img_size: int = 224, rand_augment_ops: int = 2,
                 rand_augment_magnitude: int = 9, reprob: float = 0.25, **kwargs) -> None:
        augment = None
        if rand_augment_ops > 0:
            make = rand_augment_graph if kwargs.get("backend", "dali") == "dali" else rand_augment_pil
            augment = make(rand_augment_ops, rand_augment_magnitude)
        super().__init__(shards, [student_output(img_size)], micro_batch, augment=augment, **kwargs)
        self.erasing = None
        if reprob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erasing = RandomErasing(probability=reprob, mode="pixel", device="cpu")

    def views(self, keys: list[str], sizes: list[tuple[int, int]], indices: np.ndarray) -> tuple[list[int], list[CropView]]:
        return [self.epoch] * len(keys), [sample_view(self.seed, k, self.epoch, w, h) for k, (w, h) in zip(keys, sizes)]

    def make_batch(self, keys: list[str], indices: np.ndarray, view_ids: list[int], outputs: list[torch.Tensor],
                   valid: torch.Tensor) -> Batch:
        images = outputs[0]
        if self.erasing is not None:
            images = self.erasing(images)
        labels = torch.tensor([self.manifest.labels[i] for i in indices], dtype=torch.int64)
        return Batch(images=images, keys=keys, labels=labels, valid=valid)
