"""The ``finetune`` task: image classification, cross-entropy with mixup / cutmix, top-1 / top-5 of the weights
and their EMA.

* :class:`FinetuneConfig`: the ``finetune:`` section;
* :func:`build_classification_loaders`: RandAugment / random-erasing training, center-crop evaluation;
* :class:`ClassifyTask`: the loss of one micro-batch; :func:`evaluate_classifier`: top-1 / top-5 over a loader.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from itpn_ds.data.annotations import CLASSIFICATION
from itpn_ds.data.batch import Batch, Loader
from itpn_ds.data.class_map import short_list
from itpn_ds.data.shards import Manifest
from itpn_ds.engine.ema import WeightEma
from itpn_ds.engine.export import stored_class_map
from itpn_ds.engine.loader_options import eval_crop_pct, loader_options, require_train_shards
from itpn_ds.engine.losses import (MicroResult, Task, classification_per_sample, global_mean, global_valid_count,
                                   topk_correct, valid_mask)
from itpn_ds.engine.tasks.base import Evaluator, FinetuneFamily, Loaders, log_rank0, register_task
from itpn_ds.errors import ConfigError, import_for

if TYPE_CHECKING:  # config.py imports the task modules: no import of config at run time
    from itpn_ds.config import RunConfig


@dataclass
class FinetuneConfig:
    """Fine-tuning specifics.

    init:            a checkpoint to start from: a run directory / checkpoint directory of our pre-training
                     (any ZeRO stage and world size), an exported ``.safetensors``, or an official ``.pth``.
    mixup, cutmix:   timm Mixup alphas (0 disables); label_smoothing applies with or without them.
    ema_decay:       0 disables the exponential moving average of the weights; it is evaluated too.
    eval_every_epochs: top-1/top-5 on ``data.val_shards`` every this many epochs and at the end.
    """

    init: str = ""
    num_classes: int = 1000
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    ema_decay: float = 0.0
    eval_every_epochs: int = 1


@register_task("finetune")
class ClassifyFamily(FinetuneFamily):
    """Image classification: cross-entropy with mixup / cutmix, top-1 / top-5 of the weights and their EMA."""

    best_metric = "top1"
    shard_kind = CLASSIFICATION

    def section(self) -> FinetuneConfig:
        return self.cfg.finetune

    def check(self, train: bool) -> None:
        super().check(train)
        check_label_range(self.cfg, self.manifests(train=True))  # the training labels even in evaluate

    def init_has_other_classes(self) -> bool:
        theirs = stored_class_map(self.init_source)
        if theirs is None or self.classes is None or list(theirs.ids.items()) == list(self.classes.ids.items()):
            return False
        log_rank0(logging.WARNING, "finetune.init=%s was trained on other classes (%d: %s) than %s (%d: %s): its "
                  "classification head is re-initialised", self.init_source, len(theirs), short_list(theirs.names),
                  self.classes_source, len(self.classes), short_list(self.classes.names))
        return True

    def loaders(self, rank: int, world_size: int, train: bool) -> Loaders:
        return build_classification_loaders(self.cfg, rank, world_size, train)

    def loss(self, device: torch.device) -> Task:
        return ClassifyTask(label_smoothing=self.section().label_smoothing, mixup=build_mixup(self.section()))

    def weight_ema(self, module: nn.Module) -> WeightEma | None:
        decay = self.section().ema_decay
        return WeightEma(module, decay) if decay > 0 else None

    def evaluator(self, model: Any, loader: Loader, device: torch.device, autocast_dtype: torch.dtype | None,
                  ema: WeightEma | None) -> Evaluator:
        table = self.alignment.label_table() if self.alignment is not None and self.alignment.renumbers else None

        def evaluate() -> dict[str, float]:
            metrics = evaluate_classifier(model, loader, device, autocast_dtype, table)
            if ema is not None:
                with ema.applied():
                    averaged = evaluate_classifier(model, loader, device, autocast_dtype, table)
                metrics.update({f"ema_{k}": v for k, v in averaged.items() if k != "samples"})
            return metrics
        return evaluate


# ----------------------------------------------------------------------------------- checks and loaders

def check_label_range(cfg: RunConfig, manifests: dict[str, Manifest]) -> None:
    """Fine-tuning: every label of the shards ``manifests`` (``data.<key>`` -> ``Manifest``) must be below
    ``finetune.num_classes``."""
    for key, manifest in manifests.items():
        needed = max(manifest.num_classes, max(manifest.labels, default=-1) + 1)
        if needed > cfg.finetune.num_classes:
            raise ConfigError(f"data.{key}={getattr(cfg.data, key)} has {needed} classes (labels 0..{needed - 1}) but "
                              f"finetune.num_classes={cfg.finetune.num_classes}: set finetune.num_classes={needed}")


def build_classification_loaders(cfg: RunConfig, rank: int, world_size: int, train: bool = True
                                 ) -> tuple[Loader | None, Loader | None]:
    """(RandAugment / random-erasing train loader over ``data.shards``, center-crop eval loader over
    ``data.val_shards``); either None when not asked or not configured."""
    data = import_for("itpn_ds.data", "data")
    d, common = cfg.data, loader_options(cfg, rank, world_size)
    train_loader = eval_loader = None
    if train:
        require_train_shards(cfg)
        train_loader = data.build_finetune_loader(d.shards, rand_augment_ops=d.rand_augment_ops,
                                                  rand_augment_magnitude=d.rand_augment_magnitude, reprob=d.reprob,
                                                  **common)
    if d.val_shards:
        eval_loader = data.build_eval_loader(d.val_shards, crop_pct=eval_crop_pct(d.crop_pct, common["img_size"]),
                                             **common)
    return train_loader, eval_loader


# ------------------------------------------------------------------------------------ loss and evaluation

def build_mixup(ft: FinetuneConfig) -> Any:
    """timm's Mixup for fine-tuning, or None when mixup and cutmix are both off."""
    if ft.mixup <= 0 and ft.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, label_smoothing=ft.label_smoothing,
                 num_classes=ft.num_classes)


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
