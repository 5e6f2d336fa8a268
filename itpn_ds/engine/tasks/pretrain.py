"""The ``pretrain`` task: CLIP distillation (cached or online teacher) or pixel reconstruction; nothing to
evaluate (its models are evaluated as classifiers, ``evaluated_as``).

* :class:`PretrainConfig`: the ``pretrain:`` section (the objective and its loss weights);
* :func:`build_pretrain_loader`: views from the teacher cache or drawn here, masks, the teacher's view with the
  online teacher; :func:`build_online_teacher`: the frozen CLIP teacher;
* :class:`ClipDistillTask`, :class:`PixelTask`: the two objectives' losses of one micro-batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from itpn_ds.data.batch import Batch, Loader
from itpn_ds.engine.loader_options import loader_options, require_train_shards
from itpn_ds.engine.losses import (MicroResult, Task, clip_distill_per_sample, global_mean, global_valid_count,
                                   valid_mask)
from itpn_ds.engine.tasks.base import Loaders, TaskFamily, register_task
from itpn_ds.errors import ConfigError, check_choice, import_for
from itpn_ds.models.pixel_mae import ids_from_mask

if TYPE_CHECKING:  # config.py imports the task modules: no import of config (nor runtime) at run time
    from itpn_ds.config import RunConfig
    from itpn_ds.engine.runtime import Runtime

OBJECTIVES = ("clip", "pixel")


@dataclass
class PretrainConfig:
    """Pre-training objective. ``clip``: SmoothL1 (beta ``smooth_l1_beta``) between teacher targets and
    both main and auxiliary outputs over all tokens, loss = main + aux_weight x aux. ``pixel``: the pixel
    model's normalized-pixel loss on masked patches, with MAE-style random masks of ``mask_ratio``
    (the CLIP objective uses block masks)."""

    objective: str = "clip"
    smooth_l1_beta: float = 2.0
    aux_weight: float = 1.0
    mask_ratio: float = 0.75

    def __post_init__(self) -> None:
        check_choice("pretrain.objective", self.objective, OBJECTIVES)
        if not 0 <= self.mask_ratio < 1:
            raise ConfigError(f"pretrain.mask_ratio must be in [0, 1), got {self.mask_ratio}")


@register_task("pretrain")
class PretrainFamily(TaskFamily):
    """CLIP distillation (cached or online teacher) or pixel reconstruction; nothing to evaluate."""

    evaluated_as = "finetune"

    def section(self) -> PretrainConfig:
        return self.cfg.pretrain

    def prepare_model(self, model: nn.Module, runtime: Runtime, train: bool) -> nn.Module:
        check_objective(self.cfg, model)
        return model

    def loaders(self, rank: int, world_size: int, train: bool) -> Loaders:
        return (build_pretrain_loader(self.cfg, rank, world_size) if train else None), None

    def loss(self, device: torch.device) -> Task:
        cfg, section = self.cfg, self.section()
        if section.objective == "pixel":
            return PixelTask()
        teacher = build_online_teacher(cfg, device) if cfg.teacher.mode == "online" else None
        return ClipDistillTask(beta=section.smooth_l1_beta, aux_weight=section.aux_weight, teacher=teacher)


# ------------------------------------------------------------------------------------ model and loaders

def check_objective(cfg: RunConfig, model: nn.Module) -> None:
    """The pre-training objective needs its model family: CLIP distillation heads or a pixel decoder."""
    from itpn_ds.models.clip_distill import ClipDistillHeads
    from itpn_ds.models.pixel_mae import ITPNPixelMAE

    needed = {"clip": (ClipDistillHeads, "a CLIP-distillation model (clip_tpn_*, fast_clip_tpn_*)"),
              "pixel": (ITPNPixelMAE, "an ITPNPixelMAE model (itpn_*_dec512d8b)")}
    cls, family = needed[cfg.pretrain.objective]
    if not isinstance(model, cls):
        raise ConfigError(f"pretrain.objective={cfg.pretrain.objective} needs {family}; "
                          f"model.name={cfg.model.name!r} builds {type(model).__name__}")


def build_pretrain_loader(cfg: RunConfig, rank: int, world_size: int) -> Loader:
    """The pre-training loader over ``data.shards``: views from the teacher cache or drawn here, masks, and the
    teacher's view with the online teacher (``itpn_ds.data.build_pretrain_loader``)."""
    data = import_for("itpn_ds.data", "data")
    require_train_shards(cfg)
    pixel = cfg.pretrain.objective == "pixel"
    online = cfg.teacher.mode == "online" and not pixel
    return data.build_pretrain_loader(cfg.data.shards, views=_view_source(cfg), num_masked=cfg.data.num_masked,
                                      patch_size=cfg.model.kwargs.get("patch_size", 16),
                                      teacher_resolution=cfg.teacher.resolution if online else 0,
                                      mask_ratio=cfg.pretrain.mask_ratio if pixel else None,
                                      **loader_options(cfg, rank, world_size))


def _view_source(cfg: RunConfig) -> Any:
    if cfg.teacher.mode == "cache" and cfg.pretrain.objective == "clip":
        if not cfg.teacher.cache:
            raise ConfigError("teacher.mode=cache needs teacher.cache (itpn-ds extract-teacher output)")
        teacher = import_for("itpn_ds.teacher", "teacher.cache")
        cache = teacher.TeacherCache(Path(cfg.teacher.cache), shards=Path(cfg.data.shards),
                                     expected_teacher=expected_cache_teacher(cfg), color_jitter=cfg.data.color_jitter)
        if tuple(cache.meta.scale) != tuple(cfg.data.crop_scale):
            raise ConfigError(f"teacher.cache {cfg.teacher.cache} holds boxes drawn with crop scale {cache.meta.scale} "
                              f"but data.crop_scale is {cfg.data.crop_scale}: make them agree (the cache defines the views)")
        return cache
    from itpn_ds.data.views import SampledViews

    return SampledViews(seed=cfg.schedule.seed, scale=cfg.data.crop_scale, color_jitter=cfg.data.color_jitter)


def expected_cache_teacher(cfg: RunConfig) -> dict[str, Any]:
    """What the run requires of a cache's teacher: its resolution, and the checkpoint's sha256 when the run
    names ``teacher.checkpoint`` (so a cache made with other weights is refused)."""
    expected: dict[str, Any] = {"resolution": cfg.teacher.resolution}
    if cfg.teacher.checkpoint:
        from itpn_ds.teacher.clip import file_sha256

        expected["checkpoint_sha256"] = file_sha256(cfg.teacher.checkpoint)
    return expected


def build_online_teacher(cfg: RunConfig, device: torch.device) -> Any:
    """The frozen CLIP teacher (teacher.mode=online): images in [0, 1] -> targets (B, T, D)."""
    if not cfg.teacher.checkpoint:
        raise ConfigError("teacher.mode=online needs teacher.checkpoint (a CLIP checkpoint file)")
    teacher = import_for("itpn_ds.teacher", "teacher.mode=online")
    return teacher.load_teacher(cfg.teacher.arch, cfg.teacher.checkpoint, device=device,
                                resolution=cfg.teacher.resolution)


# ------------------------------------------------------------------------------------------------ losses

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
