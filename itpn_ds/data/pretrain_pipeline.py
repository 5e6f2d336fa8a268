"""Pre-training loader: student view (+ optional teacher view from the SAME box) and block masks.

Views come from a :class:`~itpn_ds.data.views.ViewSource`: a teacher cache replays the box, flip and
colour-jitter factors it was extracted with and hands its targets; ``SampledViews`` draws a fresh
RandomResizedCrop + flip + jitter per epoch. The decoder applies the jitter when the source's views carry
it (``views.color_jitter > 0``), to the box before both resizes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from itpn_ds.data.batch import Batch
from itpn_ds.data.masking import BlockMaskGenerator, RandomMaskGenerator
from itpn_ds.data.shard_loader import ShardLoader, student_output
from itpn_ds.data.views import CropView, ViewSource


class PretrainLoader(ShardLoader):
    """images (B, 3, S, S) normalized (bicubic), bool_masked_pos (B, (S/patch)^2), view_ids (B,),
    targets (B, T, D) from the view source or teacher_images (B, 3, R, R) in [0, 1] (lanczos).

    Masks are block masks of ``num_masked`` patches (CLIP objective) or, with ``mask_ratio``, MAE-style
    random masks (pixel objective)."""

    def __init__(self, shards: str | Path, views: ViewSource, micro_batch: int, img_size: int = 224,
                 teacher_resolution: int = 0, patch_size: int = 16, num_masked: int | None = None,
                 mask_ratio: float | None = None, normalize: str = "imagenet", **kwargs) -> None:
        outputs = [student_output(img_size, normalize)] + ([(teacher_resolution, "lanczos")] if teacher_resolution else [])
        super().__init__(shards, outputs, micro_batch, color_jitter=views.color_jitter > 0, **kwargs)
        self.view_source = views
        grid = img_size // patch_size
        self.masks = (BlockMaskGenerator(grid, grid, num_masked=num_masked) if mask_ratio is None
                      else RandomMaskGenerator(grid * grid, mask_ratio))

    def views(self, keys: list[str], sizes: list[tuple[int, int]], indices: np.ndarray) -> tuple[list[int], list[CropView]]:
        pairs = self.view_source.views(keys, sizes, self.epoch)
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def make_batch(self, keys: list[str], indices: np.ndarray, view_ids: list[int], outputs: list[torch.Tensor],
                   valid: torch.Tensor) -> Batch:
        return Batch(images=outputs[0], keys=keys,
                     labels=torch.tensor([self.manifest.labels[i] for i in indices], dtype=torch.int64),
                     bool_masked_pos=self.masks.batch(self.seed, self.epoch, indices),
                     view_ids=torch.tensor(view_ids, dtype=torch.int64),
                     teacher_images=outputs[1] if len(outputs) > 1 else None,
                     targets=self.view_source.targets(keys, view_ids), valid=valid)
