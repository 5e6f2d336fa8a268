"""Forward FLOPs per image, counted from the architecture (for MFU and capacity planning).

The count runs one forward of a single example under ``torch.utils.flop_counter.FlopCounterMode``, which
adds up the matmul / conv / attention FLOPs of the real modules (2 FLOPs per multiply-add). On the meta
device it costs nothing, so ``forward_flops(model_on_meta)`` is cheap even for iTPN-L.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from itpn_ds.models.clip_distill import ClipDistillHeads
from itpn_ds.models.pixel_mae import ITPNPixelMAE


def example_inputs(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> tuple[tuple, dict]:
    """(args, kwargs) for one image at ``img_size`` px, a side or (h, w) (default: the model's; a dense task
    model: its backbone's), on the model's device."""
    param = next(model.parameters())
    size = img_size or getattr(model, "img_size", None) or model.dense_backbone.img_size
    height, width = (size, size) if isinstance(size, int) else size
    images = torch.zeros(1, 3, height, width, device=param.device, dtype=param.dtype)
    if isinstance(model, ClipDistillHeads):  # iTPN and Fast-iTPN CLIP distillation
        grid = (size // model.patch_size) ** 2
        return (images, torch.zeros(1, grid, dtype=torch.bool, device=param.device)), {}
    if isinstance(model, ITPNPixelMAE):
        grid = (size // model.patch_size) ** 2
        keep = int(grid * 0.25)
        ids = torch.arange(grid, device=param.device)[None]
        return (images,), dict(ids_keep=ids[:, :keep], ids_restore=ids)
    return (images,), {}


def forward_flops(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> int:
    """Forward FLOPs for one image (pixel model: at its 75 % masking)."""
    args, kwargs = example_inputs(model, img_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*args, **kwargs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
