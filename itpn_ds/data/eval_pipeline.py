"""Evaluation loader: the center crop that, resized to ``img_size``, equals resizing the shorter side to
``img_size / crop_pct`` and center-cropping ``img_size`` (timm's eval transform), decoded box-only.
Order is fixed (epoch 0's permutation); padding in the last step carries valid=False."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from itpn_ds.data.batch import Batch
from itpn_ds.data.shard_loader import FixedPass, ShardLoader, student_output
from itpn_ds.data.views import CropView, key_hash


def center_crop_view(width: int, height: int, crop_pct: float) -> CropView:
    """Square box of side crop_pct x shorter side, centered (source pixels)."""
    side = max(1, round(min(width, height) * crop_pct))
    return CropView((width - side) // 2, (height - side) // 2, side, side, False)


def per_class_subset(keys: list[str], labels: list[int], per_class: int, seed: int = 0) -> np.ndarray:
    """Sample indices, ascending, of at most ``per_class`` samples of each label (0: all): those of the lowest
    ``key_hash(seed, key)``, so the choice depends on the keys alone, not on the shards' order or the ranks."""
    if per_class <= 0:
        return np.arange(len(keys))
    by_label: dict[int, list[int]] = {}
    for index in sorted(range(len(keys)), key=lambda i: key_hash("per-class-subset", seed, keys[i])):
        chosen = by_label.setdefault(labels[index], [])
        if len(chosen) < per_class:
            chosen.append(index)
    return np.array(sorted(i for chosen in by_label.values() for i in chosen), dtype=np.int64)


class EvalLoader(FixedPass, ShardLoader):
    def __init__(self, shards: str | Path, micro_batch: int, img_size: int = 224, crop_pct: float = 0.875,
                 normalize: str = "imagenet", **kwargs) -> None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        super().__init__(shards, [student_output(img_size, normalize)], micro_batch, **kwargs)
        self.crop_pct = crop_pct

    def views(self, keys: list[str], sizes: list[tuple[int, int]], indices: np.ndarray) -> tuple[list[int], list[CropView]]:
        return [0] * len(keys), [center_crop_view(w, h, self.crop_pct) for w, h in sizes]

    def make_batch(self, keys: list[str], indices: np.ndarray, view_ids: list[int], outputs: list[torch.Tensor],
                   valid: torch.Tensor) -> Batch:
        labels = torch.tensor([self.manifest.labels[i] for i in indices], dtype=torch.int64)
        return Batch(images=outputs[0], keys=keys, labels=labels, valid=valid)
