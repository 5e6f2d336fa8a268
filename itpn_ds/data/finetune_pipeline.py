"""Fine-tuning train loader: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) + flip per (seed, key, epoch),
decoded box-only and resized bicubic, ImageNet-normalized. Mixup/cutmix/label smoothing are applied by
the engine on the batch (timm's Mixup)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from itpn_ds.data.batch import Batch
from itpn_ds.data.shard_loader import ShardLoader, normalize
from itpn_ds.data.views import CropView, sample_view


class FinetuneLoader(ShardLoader):
    def __init__(self, shards: str | Path, micro_batch: int, img_size: int = 224, **kwargs) -> None:
        super().__init__(shards, [(img_size, "cubic")], micro_batch, **kwargs)

    def views(self, keys: list[str], sizes: list[tuple[int, int]], indices: np.ndarray) -> tuple[list[int], list[CropView]]:
        return [self.epoch] * len(keys), [sample_view(self.seed, k, self.epoch, w, h) for k, (w, h) in zip(keys, sizes)]

    def make_batch(self, keys: list[str], indices: np.ndarray, view_ids: list[int], outputs: list[torch.Tensor],
                   valid: torch.Tensor) -> Batch:
        labels = torch.tensor([self.manifest.labels[i] for i in indices], dtype=torch.int64)
        return Batch(images=normalize(outputs[0]), keys=keys, labels=labels, valid=valid)
