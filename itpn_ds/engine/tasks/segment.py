"""The ``segment`` task: UperNet fine-tuning and mIoU evaluation on the engine (docs/dense.md).

* :class:`SegmentConfig`: the ``segment:`` section, the data pipeline's training recipe (``SegRecipe``) and the
  task's own keys (class count, loss weight, evaluation);
* :func:`resolve_config`, :func:`check_class_count`, :func:`check_model`: ``segment.num_classes`` is the one
  class count (the model's ``num_classes`` follows it; the class map trained must agree: data.shards', or the
  one stored with the evaluated weights); crop sizes fit the backbone's stride.
* :func:`build_loaders`: ``SegTrainLoader`` with the ``segment`` section as its recipe, ``SegEvalLoader`` at
  ``segment.scale``.
* the heads' BatchNorm: SyncBatchNorm on several CUDA ranks, running statistics averaged over the ranks
  elsewhere (``itpn_ds.engine.batch_norm``).
* :class:`SegmentTask`: cross-entropy of the decode head + ``aux_weight`` x that of the auxiliary head, each the
  mean over every labelled pixel of the step on all ranks (ignored pixels and padding samples count nothing).
* :func:`evaluate_segmentation`: sliding-window or whole-image inference, logits resized to each label map's
  original size, per-class intersection / union / prediction / label areas summed over all ranks (one
  all-reduce, as mmseg's ``total_intersect_and_union``) -> aAcc, mIoU, mAcc and per-class IoU / Acc; a split of
  fewer classes than training (or numbered otherwise) has its label maps mapped to training's ids and is scored
  over its own classes only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from itpn_ds.data.annotations import SEGMENTATION
from itpn_ds.data.batch import Batch, Loader
from itpn_ds.data.class_map import Alignment, ClassMap
from itpn_ds.data.seg_transforms import SegRecipe
from itpn_ds.engine import batch_norm
from itpn_ds.engine.batch_norm import RankAveragedStats, synchronised
from itpn_ds.engine.ema import WeightEma
from itpn_ds.engine.losses import MicroResult, Task, global_mean, global_valid_count, valid_mask
from itpn_ds.engine.model import forward_flops_per_image
from itpn_ds.engine.tasks.base import DenseFamily, Evaluator, Loaders, register_task
from itpn_ds.errors import ConfigError, check_choice
from itpn_ds.models.segmentation import IGNORE_INDEX, SegmentationModel, upsample_logits

if TYPE_CHECKING:  # config.py imports the task modules: no import of config (nor runtime) at run time
    from itpn_ds.config import RunConfig
    from itpn_ds.engine.runtime import Runtime

BEST_METRIC = "mIoU"
SEG_EVAL_MODES = ("slide", "whole")


@dataclass
class SegmentConfig(SegRecipe):
    """Semantic segmentation fine-tuning (``task: segment``, ``itpn-ds segment``; docs/dense.md): the training
    pipeline's recipe (:class:`~itpn_ds.data.seg_transforms.SegRecipe`: ``crop_size``, ``scale``, ``ratio_range``,
    ``cat_max_ratio``, ``flip_prob``, ``photometric``) and the task's keys.

    crop_size:       (h, w) training crop in px; sides multiples of the layout's coarsest stride (32).
    scale:           (long, short) edge bounds of the keep-ratio rescale, train (times ``ratio_range``) and
                     evaluation (mmseg ADE20K: 2048, 512).
    init:            checkpoint to start from, as ``finetune.init`` (a pre-training run: its backbone and
                     pyramid load, the heads start at init; a segmentation run or export: everything loads).
    num_classes:     classes of the shards' manifest (ADE20K 150); the model's ``num_classes`` follows it.
    aux_weight:      loss weight of the auxiliary FCN head (published 0.4; 0 leaves it out of the loss).
    eval_mode:       ``slide`` (windows of ``eval_crop`` every ``eval_stride`` px, logits averaged) or
                     ``whole`` (the whole rescaled image at once).
    eval_every_epochs: mIoU on ``data.val_shards`` every this many epochs and at the end; the best is
                     exported to ``RUN_DIR/best``.
    sync_bn:         BatchNorm of the heads as SyncBatchNorm over the ranks when there are several and the
                     device is CUDA (PyTorch's SyncBatchNorm has no CPU kernel: plain BN per rank there).
    """

    init: str = ""
    num_classes: int = 150
    aux_weight: float = 0.4
    eval_mode: str = "slide"
    eval_crop: tuple[int, int] = (512, 512)
    eval_stride: tuple[int, int] = (341, 341)
    eval_every_epochs: int = 1
    sync_bn: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("segment.eval_mode", self.eval_mode, SEG_EVAL_MODES)
        for key in ("eval_crop", "eval_stride"):
            setattr(self, key, tuple(getattr(self, key)))
            if len(getattr(self, key)) != 2 or not min(getattr(self, key)) > 0:
                raise ConfigError(f"segment.{key} must be two positive numbers, got {list(getattr(self, key))}")
        if self.num_classes < 1:
            raise ConfigError(f"segment.num_classes must be >= 1, got {self.num_classes}")
        if self.aux_weight < 0:
            raise ConfigError(f"segment.aux_weight must be >= 0, got {self.aux_weight}")
        if any(s > c for s, c in zip(self.eval_stride, self.eval_crop)):
            raise ConfigError(f"segment.eval_stride {list(self.eval_stride)} must not exceed segment.eval_crop "
                              f"{list(self.eval_crop)} (windows would leave pixels out)")


@register_task("segment")
class SegmentFamily(DenseFamily):
    """Semantic segmentation (UperNet + FCN): mIoU / mAcc / aAcc and per-class IoU."""

    best_metric = BEST_METRIC
    shard_kind = SEGMENTATION

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.class_names: list[str] = []

    def section(self) -> SegmentConfig:
        return self.cfg.segment

    def check(self, train: bool) -> None:
        super().check(train)
        resolve_config(self.cfg)  # sets model.kwargs.num_classes, so before the resume check
        self.class_names = check_class_count(self.cfg, self.classes, self.classes_source)

    def check_model(self, model: nn.Module, runtime: Runtime) -> None:
        check_model(self.cfg, model, runtime.world_size, runtime.device)

    def flops_per_image(self, model: nn.Module) -> float:
        return forward_flops_per_image(model, self.section().crop_size)

    def loaders(self, rank: int, world_size: int, train: bool) -> Loaders:
        return build_loaders(self.cfg, rank, world_size, train)

    def after_engine(self, engine: Any) -> None:
        batch_norm.norm_buffers_to_param_dtype(engine.module)

    def loss(self, device: torch.device) -> Task:
        return SegmentTask(aux_weight=self.section().aux_weight)

    def evaluator(self, model: Any, loader: Loader, device: torch.device, autocast_dtype: torch.dtype | None,
                  ema: WeightEma | None) -> Evaluator:
        s = self.section()
        return lambda: evaluate_segmentation(model, loader, device, autocast_dtype, self.class_names,
                                             s.eval_mode, s.eval_crop, s.eval_stride, self.alignment)

    def report(self, metrics: dict[str, float]) -> str:
        return (" ".join(f"{k} {metrics[k]:.4f}" for k in ("mIoU", "mAcc", "aAcc")) + "\n"
                + format_per_class(metrics))


# ------------------------------------------------------------------------------------------ configuration

def resolve_config(cfg: RunConfig) -> None:
    """``model.kwargs.num_classes`` := ``segment.num_classes`` (stated in the saved config and checkpoints);
    a recipe that states another value is refused."""
    stated = cfg.model.kwargs.get("num_classes")
    if stated is not None and stated != cfg.segment.num_classes:
        raise ConfigError(f"model.kwargs.num_classes={stated} but segment.num_classes={cfg.segment.num_classes}: "
                          "state the class count once, in segment.num_classes")
    cfg.model.kwargs["num_classes"] = cfg.segment.num_classes


def check_class_count(cfg: RunConfig, classes: ClassMap | None, source: str) -> list[str]:
    """The class names (by training id) of the class map trained (``source``: data.shards, or the evaluated
    weights); refuses a class count other than ``segment.num_classes``, naming where the map comes from. None
    (no training shards given: refused with the loaders): []."""
    if classes is None:
        return []
    if len(classes) != cfg.segment.num_classes:
        raise ConfigError(f"{source} has {len(classes)} classes but segment.num_classes={cfg.segment.num_classes}: "
                          f"set segment.num_classes={len(classes)}")
    return classes.names


def check_model(cfg: RunConfig, model: nn.Module, world_size: int, device: torch.device) -> None:
    """The model is a segmentation model whose backbone takes the crops; a micro-batch of one image per rank
    needs synchronised BatchNorm (the pyramid pooling's 1x1 level has one value per channel otherwise)."""
    if not isinstance(model, SegmentationModel):
        raise ConfigError(f"task segment needs a segmentation model (upernet_*); model.name={cfg.model.name!r} "
                          f"builds {type(model).__name__}")
    stride = model.dense_backbone.coarsest_stride
    for key in ("crop_size", "eval_crop"):
        size = getattr(cfg.segment, key)
        if any(side % stride for side in size):
            raise ConfigError(f"segment.{key}={list(size)} is not a multiple of the segmentation layout's coarsest "
                              f"stride {stride}: use e.g. {[max(stride, round(s / stride) * stride) for s in size]}")
    if cfg.data.micro_batch < 2 and not synchronised(cfg.segment.sync_bn, world_size, device):
        raise ConfigError(f"data.micro_batch={cfg.data.micro_batch}: the heads' BatchNorm needs at least 2 images per "
                          "rank when it is not synchronised over ranks (one CUDA rank or the CPU); use "
                          "data.micro_batch=2 or more")


def build_loaders(cfg: RunConfig, rank: int, world_size: int, train: bool = True
                  ) -> tuple[Loader | None, Loader | None]:
    """(SegTrainLoader with the ``segment`` section as its recipe, SegEvalLoader) over ``data.shards`` /
    ``data.val_shards``; either None when not asked."""
    from itpn_ds.data import build_segmentation_loader

    d, s = cfg.data, cfg.segment
    common = dict(rank=rank, world_size=world_size, micro_batch=d.micro_batch, seed=cfg.schedule.seed,
                  num_threads=d.num_threads, backend=d.loader, device=d.device, normalize=d.normalize)
    train_loader = eval_loader = None
    if train:
        if not d.shards:
            raise ConfigError("data.shards is empty: give the segmentation shard directory (itpn-ds make-shards "
                              "--kind segmentation output)")
        train_loader = build_segmentation_loader(d.shards, train=True, recipe=s, **common)
    if d.val_shards:
        eval_loader = build_segmentation_loader(d.val_shards, train=False, scale=s.scale, **common)
    return train_loader, eval_loader


# -------------------------------------------------------------------------------------------------- loss

def pixel_loss_sums(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy summed over each sample's labelled pixels: logits (B, K, h, w) upsampled (bilinear) to the
    labels (B, H, W) int64 -> (B,) float32."""
    logits = upsample_logits(logits, labels.shape[-2:]).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none").sum((1, 2))


@dataclass
class SegmentTask:
    """UperNet's loss: decode-head CE + ``aux_weight`` x auxiliary-head CE, each the mean over all labelled
    pixels of the micro-batch on every rank (DeepSpeed's average of gradients then gives that mean). Plain
    BatchNorm on several ranks (the CPU) has its running statistics averaged over the ranks after the forward."""

    aux_weight: float = 0.4
    ignore_index: int = IGNORE_INDEX
    name: str = "segment"
    _stats: RankAveragedStats = field(default_factory=RankAveragedStats, repr=False)

    def forward(self, model: nn.Module, batch: Batch) -> MicroResult:
        if batch.label_maps is None:
            raise ValueError("segmentation batch has no label_maps")
        valid = valid_mask(batch.valid, len(batch), batch.images.device)
        labels = batch.label_maps.masked_fill(~valid.bool()[:, None, None], self.ignore_index)  # padding: ignored
        output = model(batch.images)
        self._stats(model)
        pixels = global_valid_count((labels != self.ignore_index).float())  # labelled pixels, all ranks
        loss_seg = global_mean(pixel_loss_sums(output.logits, labels, self.ignore_index), valid, pixels)
        parts = {"loss_seg": loss_seg.detach()}
        loss = loss_seg
        if output.aux_logits is not None and self.aux_weight > 0:
            loss_aux = global_mean(pixel_loss_sums(output.aux_logits, labels, self.ignore_index), valid, pixels)
            parts["loss_aux"] = loss_aux.detach()
            loss = loss + self.aux_weight * loss_aux
        return MicroResult(loss, parts, global_valid_count(valid))


# -------------------------------------------------------------------------------------------- inference

def whole_logits(model: nn.Module, images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Images (B, 3, h, w) of any size -> class scores (B, K, h, w) float32: zero-padded at the bottom/right to
    a multiple of the backbone's coarsest stride, logits upsampled to the padded size, the padding cut off."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (0, -w % multiple, 0, -h % multiple))
    logits = model(padded).logits
    return upsample_logits(logits, padded.shape[-2:])[..., :h, :w].float()


def window_boxes(height: int, width: int, crop: Sequence[int], stride: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """mmseg's sliding windows (y1, x1, y2, x2) over an image of ``height`` x ``width``: a grid of ``stride``
    steps, the last window of each row and column moved back to end at the border; each at most ``crop``."""
    (ch, cw), (sh, sw) = crop, stride
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, height), min(c * sw + cw, width)
            boxes.append((max(y2 - ch, 0), max(x2 - cw, 0), y2, x2))
    return boxes


def slide_logits(model: nn.Module, image: torch.Tensor, crop: Sequence[int], stride: Sequence[int],
                 multiple: int) -> torch.Tensor:
    """One image (1, 3, H, W) -> scores (1, K, H, W): the windows of :func:`window_boxes` in one batch (they
    share one size), their scores summed into place and divided by how many windows cover each pixel."""
    height, width = image.shape[-2:]
    boxes = window_boxes(height, width, crop, stride)
    windows = torch.cat([image[..., y1:y2, x1:x2] for y1, x1, y2, x2 in boxes])
    scores = whole_logits(model, windows, multiple)
    total = scores.new_zeros((1, scores.shape[1], height, width))
    count = scores.new_zeros((1, 1, height, width))
    for (y1, x1, y2, x2), window in zip(boxes, scores):
        total[..., y1:y2, x1:x2] += window
        count[..., y1:y2, x1:x2] += 1
    return total / count


# ---------------------------------------------------------------------------------------------- metrics

def area_counts(prediction: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
                ) -> torch.Tensor:
    """(4, K) float64: per class the intersection, union, predicted and labelled pixel counts of one image
    (prediction and label (H, W) int64; ignored pixels left out), as mmseg's ``intersect_and_union``."""
    keep = label != ignore_index
    prediction, label = prediction[keep], label[keep]
    intersect = torch.bincount(label[prediction == label], minlength=num_classes)[:num_classes]
    area_pred = torch.bincount(prediction, minlength=num_classes)[:num_classes]
    area_label = torch.bincount(label, minlength=num_classes)[:num_classes]
    return torch.stack([intersect, area_pred + area_label - intersect, area_pred, area_label]).double()


def metric_name(class_name: str) -> str:
    """A class name usable in a metric key (MLflow: letters, digits, ``_-. /``)."""
    return re.sub(r"[^A-Za-z0-9_\-. ]", "_", class_name).strip() or "_"


def summarize(counts: torch.Tensor, class_names: Sequence[str]) -> dict[str, float]:
    """(4, K) summed counts -> aAcc, mIoU, mAcc (%, means over the classes present: union or labels > 0, as
    mmseg's nan-mean), ``IoU/<class>`` and ``Acc/<class>`` of every present class, and ``pixels``."""
    intersect, union, _, area_label = counts
    metrics = {"aAcc": 100 * float(intersect.sum() / area_label.sum().clamp(min=1))}
    iou, acc = intersect / union, intersect / area_label  # nan where absent
    metrics["mIoU"] = 100 * float(iou.nanmean()) if bool((union > 0).any()) else 0.0
    metrics["mAcc"] = 100 * float(acc.nanmean()) if bool((area_label > 0).any()) else 0.0
    for k, name in enumerate(class_names):
        if union[k] > 0:
            metrics[f"IoU/{metric_name(name)}"] = 100 * float(iou[k])
        if area_label[k] > 0:
            metrics[f"Acc/{metric_name(name)}"] = 100 * float(acc[k])
    metrics["pixels"] = float(area_label.sum())
    return metrics


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader: Any, device: torch.device, autocast_dtype: torch.dtype | None,
                          class_names: Sequence[str], mode: str = "slide", crop: Sequence[int] = (512, 512),
                          stride: Sequence[int] = (341, 341), alignment: Alignment | None = None) -> dict[str, float]:
    """mIoU / mAcc / aAcc (%) and per-class IoU / Acc over a ``SegEvalLoader``, all ranks together.

    Per image: its region ``images[i, :, :h, :w]`` (``image_sizes``) through ``slide`` or ``whole`` inference,
    the scores resized (bilinear) to the original label size (``label_sizes``), the argmax scored against the
    label map with 255 ignored. Padding samples are left out; every rank iterates the same batches.
    ``class_names``: training's, by id; ``alignment``: the split's labels in training's ids (None: the same map)
    and the classes it has, the only ones the means count.
    """
    table = alignment.label_table().to(device) if alignment is not None and alignment.renumbers else None
    module = getattr(model, "module", model)
    multiple = module.dense_backbone.coarsest_stride
    was_training = model.training
    model.eval()
    param_dtype = next(module.parameters()).dtype
    counts = torch.zeros(4, len(class_names), dtype=torch.float64, device=device)
    for batch in loader:
        batch = batch.to(device)
        for i in range(len(batch)):
            if batch.valid is not None and not bool(batch.valid[i]):
                continue
            (h, w), (lh, lw) = batch.image_sizes[i].tolist(), batch.label_sizes[i].tolist()
            image = batch.images[i:i + 1, :, :h, :w].to(param_dtype)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                scores = (slide_logits(model, image, crop, stride, multiple) if mode == "slide"
                          else whole_logits(model, image, multiple))
            prediction = upsample_logits(scores, (lh, lw)).argmax(1)[0]
            label = batch.label_maps[i, :lh, :lw]
            counts += area_counts(prediction, table[label] if table is not None else label, len(class_names))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    model.train(was_training)
    if alignment is not None and alignment.missing:
        kept = alignment.trained_ids
        return summarize(counts.cpu()[:, kept], [class_names[k] for k in kept])
    return summarize(counts.cpu(), class_names)


def format_per_class(metrics: dict[str, float]) -> str:
    """``IoU circle 81.2, rectangle 77.0, ...``: the per-class IoU of ``metrics`` for the log."""
    per_class = [(k.split("/", 1)[1], v) for k, v in metrics.items() if k.startswith("IoU/")]
    return "IoU " + ", ".join(f"{name} {value:.1f}" for name, value in per_class) if per_class else "no class present"
