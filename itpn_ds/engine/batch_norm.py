"""BatchNorm in the dense heads over several ranks: synchronised where PyTorch can, kept equal where it cannot.

The heads of both dense tasks normalise with BatchNorm (UperNet's and the FCN's convs; Mask R-CNN's box head
over its RoIs). Their running statistics are buffers, which no gradient all-reduce touches, so with plain
BatchNorm each rank's would drift apart: a checkpoint (written from rank 0) would then resume other ranks
with other statistics, and each rank would evaluate its share of the images with its own.

* :func:`sync_batch_norm`: ``torch.nn.SyncBatchNorm`` (statistics over all ranks, the published SyncBN) when
  asked, on several CUDA ranks; plain BatchNorm otherwise (PyTorch's SyncBatchNorm has no CPU kernel).
* :class:`RankAveragedStats`: after every training forward, the running statistics of the plain BatchNorm
  layers replaced by their mean over the ranks (one all-reduce), so they stay equal everywhere.
* :func:`norm_buffers_to_param_dtype`: the running statistics in the dtype DeepSpeed gave the parameters.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("itpn_ds.engine")


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def synchronised(sync_bn: bool, world_size: int, device: torch.device) -> bool:
    """Whether ``sync_batch_norm`` converts: asked for, several ranks, CUDA."""
    return sync_bn and world_size > 1 and device.type == "cuda"


def sync_batch_norm(model: nn.Module, sync_bn: bool, world_size: int, device: torch.device,
                    option: str) -> nn.Module:
    """``model`` with its BatchNorm layers as ``SyncBatchNorm`` when ``synchronised``, else as it is (then
    :class:`RankAveragedStats` keeps the running statistics equal). ``option``: the config key of ``sync_bn``,
    for the log line. The parameter and buffer names are the same, so checkpoints move between the two."""
    count = len(batch_norms(model))
    if synchronised(sync_bn, world_size, device):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log.info("heads' BatchNorm: %d layers synchronised over %d ranks (SyncBatchNorm)", count, world_size)
    elif world_size > 1 and count:
        why = f"{option}=false" if not sync_bn else "no SyncBatchNorm kernel on the CPU"
        log.info("heads' BatchNorm: %d layers normalising with per-rank batch statistics, running statistics "
                 "averaged over the ranks after every forward (%s)", count, why)
    return model


def average_running_stats(norms: Sequence[nn.Module]) -> None:
    """Replace the running mean / variance of unsynchronised BatchNorm layers by their mean over the ranks (one
    all-reduce): the running mean is then the running average of the ranks' mean batch means, as
    SyncBatchNorm's; the variance the mean of the ranks' batch variances (SyncBatchNorm: the pooled variance)."""
    slots = [(m, name) for m in norms for name in ("running_mean", "running_var") if getattr(m, name) is not None]
    if not slots:
        return
    buffers = [getattr(m, name) for m, name in slots]
    flat = torch.cat([b.float().flatten() for b in buffers])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for (module, name), old, value in zip(slots, buffers, flat.split([b.numel() for b in buffers])):
        # new tensors, not copy_: the forward's autograd graph saved the old ones (CPU BatchNorm's backward reads them)
        setattr(module, name, value.view_as(old).to(old.dtype))


def unsynced_norms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``model`` whose statistics are per rank (not SyncBatchNorm), when several ranks run."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return []
    return [m for m in batch_norms(model) if not isinstance(m, nn.SyncBatchNorm) and m.track_running_stats]


@dataclass
class RankAveragedStats:
    """Called after a training forward of ``model``: averages the running statistics of its unsynchronised
    BatchNorm layers over the ranks (found on the first call; none on one rank or with SyncBatchNorm)."""

    _norms: list[nn.Module] | None = field(default=None, repr=False)

    def __call__(self, model: nn.Module) -> None:
        if self._norms is None:
            self._norms = unsynced_norms(model)
        with torch.no_grad():
            average_running_stats(self._norms)


def norm_buffers_to_param_dtype(model: nn.Module) -> None:
    """BatchNorm running statistics in the dtype of the BatchNorm's parameters. DeepSpeed casts parameters to
    bf16 / fp16 but not buffers, and BatchNorm kernels refuse a mix (the CPU's: "expected scalar type
    BFloat16 but found Float"); the statistics are then kept at that precision, in checkpoints too (an export
    is fp32 again)."""
    for module in batch_norms(model):
        if module.weight is not None:
            for name in ("running_mean", "running_var"):
                buffer = getattr(module, name)
                if buffer is not None and buffer.dtype != module.weight.dtype:
                    setattr(module, name, buffer.to(module.weight.dtype))
