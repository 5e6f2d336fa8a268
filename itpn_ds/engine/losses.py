"""What one micro-batch costs: the result every task's loss returns, and the reductions that respect
``Batch.valid`` (padding of an epoch's last step).

A task's loss (:class:`Task`, one per task module of ``itpn_ds.engine.tasks``) turns a micro-batch already on the
device into a scalar to backpropagate and its named parts for telemetry (:class:`MicroResult`). Every loss here is
a per-sample vector reduced by :func:`global_mean`: the sum over this rank's valid samples, scaled so that
DeepSpeed's average of gradients over ranks equals the mean over all valid samples of the step (padding
contributes nothing, and ranks with fewer valid samples are not over-weighted).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class MicroResult:
    """loss: the scalar to backpropagate; parts: detached per-part means; valid: global valid count;
    targets_s: seconds spent getting teacher targets."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    valid: torch.Tensor
    targets_s: float = 0.0


class Task(Protocol):
    """A task's loss of one micro-batch (its task module's ``TaskFamily.loss`` builds it)."""

    name: str

    def forward(self, model: nn.Module, batch: Any) -> MicroResult: ...


def valid_mask(valid: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
    """(B,) float: 1 for real samples, 0 for padding."""
    if valid is None:
        return torch.ones(batch_size, device=device)
    return valid.to(device=device, dtype=torch.float32)


def global_valid_count(mask: torch.Tensor) -> torch.Tensor:
    """Number of valid samples of this micro-batch over all ranks (a collective)."""
    count = mask.sum().detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
    return count


def global_mean(per_sample: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """sum(per_sample x mask) x world / count: the global mean once ranks' gradients are averaged."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return (per_sample * mask).sum() * world / count.clamp(min=1)


def clip_distill_per_sample(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """SmoothL1 over all tokens and channels, mean per sample. pred, target: (B, T, D) -> (B,)."""
    if pred.shape != target.shape:
        raise ValueError(f"student output {tuple(pred.shape)} and teacher targets {tuple(target.shape)} differ: "
                         "check model.kwargs teacher_dim / img_size against the teacher")
    loss = F.smooth_l1_loss(pred.float(), target.float(), beta=beta, reduction="none")
    return loss.flatten(1).mean(1)


def classification_per_sample(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy per sample; soft labels (B, C) after mixup, else hard (B,) with label smoothing."""
    logits = logits.float()
    if labels.ndim == 2:
        return torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1)
    return F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="none")


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, ks: tuple[int, ...] = (1, 5)
                 ) -> dict[int, torch.Tensor]:
    """Number of valid samples whose label is in the top k, per k (k capped at the class count)."""
    maxk = min(max(ks), logits.shape[-1])
    top = logits.topk(maxk, dim=-1).indices
    hit = top.eq(labels.view(-1, 1))
    return {k: (hit[:, :min(k, maxk)].any(dim=1).float() * mask).sum() for k in ks}
