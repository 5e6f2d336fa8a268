"""What one micro-batch costs: the loss of each task, and evaluation.

A task turns a :class:`~itpn_ds.data.batch.Batch` (already on the device) into a scalar loss to
backpropagate and its named parts for telemetry; padding (``Batch.valid``) never contributes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
from torch import nn

from itpn_ds.config import ConfigError
from itpn_ds.data.batch import Batch
from itpn_ds.engine.losses import (classification_per_sample, clip_distill_per_sample, global_mean,
                                   global_valid_count, topk_correct, valid_mask)
from itpn_ds.models.pixel_mae import ids_from_mask


@dataclass
class MicroResult:
    """loss: the scalar to backpropagate; parts: detached per-part means; valid: global valid count;
    targets_s: seconds spent getting teacher targets."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    valid: torch.Tensor
    targets_s: float = 0.0


class Task(Protocol):
    name: str

    def forward(self, model: nn.Module, batch: Batch) -> MicroResult: ...


@dataclass
class ClipDistillTask:
    """SmoothL1 between CLIP targets and both outputs of ``ITPNClipDistill`` over all tokens.

    Targets come from the batch (teacher cache) or from ``teacher(batch.teacher_images)`` (online).
    """

    beta: float = 2.0
    aux_weight: float = 1.0
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None
    name: str = "pretrain_clip"

    def forward(self, model: nn.Module, batch: Batch) -> MicroResult:
        start = time.perf_counter()
        targets = self._targets(batch)
        targets_s = time.perf_counter() - start
        if batch.bool_masked_pos is None:
            raise ValueError("pre-training batch has no bool_masked_pos: the loader must produce masks")
        main, aux = model(batch.images, batch.bool_masked_pos)
        if targets.shape[1:] != main.shape[1:]:
            raise ConfigError(f"teacher targets are (B, {', '.join(map(str, targets.shape[1:]))}) but the model predicts "
                             f"(B, {', '.join(map(str, main.shape[1:]))}): the student's token grid and "
                             "model.kwargs.teacher_dim must match the teacher's (tokens, dim)")
        mask = valid_mask(batch.valid, len(batch), main.device)
        count = global_valid_count(mask)
        loss_main = global_mean(clip_distill_per_sample(main, targets, self.beta), mask, count)
        loss_aux = global_mean(clip_distill_per_sample(aux, targets, self.beta), mask, count)
        loss = loss_main + self.aux_weight * loss_aux
        return MicroResult(loss, {"loss_main": loss_main.detach(), "loss_aux": loss_aux.detach()}, count, targets_s)

    def _targets(self, batch: Batch) -> torch.Tensor:
        if batch.targets is not None:
            return batch.targets
        if self.teacher is None or batch.teacher_images is None:
            raise ValueError("pre-training batch has neither cached targets nor teacher images "
                             "(teacher.mode=cache needs a teacher cache, teacher.mode=online a teacher view)")
        with torch.no_grad():
            return self.teacher(batch.teacher_images)


@dataclass
class PixelTask:
    """MAE-style pixel objective: the pixel model predicts every patch from the visible ones; the loss
    is its normalized-pixel MSE over each sample's masked patches, averaged over valid samples.
    The masks come with the batch (``bool_masked_pos``, random masks from the loader)."""

    name: str = "pretrain_pixel"

    def forward(self, model: nn.Module, batch: Batch) -> MicroResult:
        if batch.bool_masked_pos is None:
            raise ValueError("pre-training batch has no bool_masked_pos: the loader must produce masks")
        pixel_model = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
        mask = batch.bool_masked_pos
        ids_keep, ids_restore = ids_from_mask(mask)
        _, pred, _ = model(batch.images, ids_keep=ids_keep, ids_restore=ids_restore)
        per_patch = pixel_model.per_patch_loss(batch.images, pred).float()
        per_sample = (per_patch * mask).sum(1) / mask.sum(1).clamp(min=1)
        valid = valid_mask(batch.valid, len(batch), per_sample.device)
        count = global_valid_count(valid)
        loss = global_mean(per_sample, valid, count)
        return MicroResult(loss, {"loss_pixel": loss.detach()}, count)


@dataclass
class ClassifyTask:
    """Cross-entropy with label smoothing, or soft-target cross-entropy after mixup/cutmix.

    mixup: a ``timm.data.Mixup`` (its randomness is numpy's global RNG, saved in checkpoints) or None.
    """

    label_smoothing: float = 0.0
    mixup: Any = None
    name: str = "finetune"

    def forward(self, model: nn.Module, batch: Batch) -> MicroResult:
        if batch.labels is None:
            raise ValueError("fine-tuning batch has no labels")
        images, labels = batch.images, batch.labels
        if self.mixup is not None and labels.ndim == 1:
            images, labels = self.mixup(images, labels)
        logits = model(images)
        mask = valid_mask(batch.valid, len(batch), logits.device)
        count = global_valid_count(mask)
        smoothing = 0.0 if labels.ndim == 2 else self.label_smoothing
        loss = global_mean(classification_per_sample(logits, labels, smoothing), mask, count)
        return MicroResult(loss, {"loss_ce": loss.detach()}, count)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: Any, device: torch.device, autocast_dtype: torch.dtype | None,
                        label_table: torch.Tensor | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean loss over a whole evaluation loader, all ranks together.

    Padding samples are excluded; every rank must iterate the same number of batches (the loaders pad).
    ``label_table``: (n,) int64, the training id of each of the split's label ids (``Alignment.label_table``; a
    split numbered otherwise than training); None: the labels are training's ids.
    """
    table = label_table.to(device) if label_table is not None else None
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss sum, count
    for batch in loader:
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(batch.images)
        mask = valid_mask(batch.valid, len(batch), device)
        labels = table[batch.labels] if table is not None else batch.labels
        hits = topk_correct(logits.float(), labels, mask)
        loss = (classification_per_sample(logits, labels, 0.0) * mask).sum()
        totals += torch.stack([hits[1], hits[5], loss, mask.sum()]).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    count = max(totals[3].item(), 1.0)
    return {"top1": 100 * totals[0].item() / count, "top5": 100 * totals[1].item() / count,
            "loss": totals[2].item() / count, "samples": totals[3].item()}
