"""The ``detect`` task: detection / instance-segmentation fine-tuning, the Mask R-CNN loss, COCO box and mask AP.

``task: detect`` (``itpn-ds detect``): a dense task model (``mask_rcnn_*``, ``itpn_ds.models.detection``) on
detection shards (``make-shards --kind detection``), batches from ``build_detection_loader``
(``DetectionBatch``: images of their own sizes, multi-scale resized by the loader).

* :class:`DetectConfig`: the ``detect:`` section, the data pipeline's training recipe (``DetRecipe``) and the
  task's own keys (evaluation resize, SyncBN).
* :class:`DetectTask`: the sum of torchvision's five Mask R-CNN losses (RPN objectness and box regression,
  RoI classification and box regression, mask BCE) over this rank's real images; padding images
  (``DetectionBatch.valid`` False) are left out, and each rank's loss is weighted by its share of the
  step's real images, so DeepSpeed's gradient average is the mean over the images of all ranks.
* :func:`evaluate_detector`: COCO box AP and mask AP (pycocotools' ``COCOeval``) of the model on the
  evaluation loader: detections mapped back to each image's original size and to the evaluated split's
  category ids by class name (:func:`split_category_ids`; a class the split lacks is not scored), gathered
  from every rank; the ground truth is the shards' own
  instance records (the annotation file's boxes, masks, areas and crowd flags). AP, AP50 and AP75 of both
  in percent; -1 where COCO has nothing to score (no ground truth).
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from itpn_ds.data.annotations import DETECTION
from itpn_ds.data.batch import Loader
from itpn_ds.data.class_map import ClassMap
from itpn_ds.data.det_pipeline import DetectionBatch, DetRecipe
from itpn_ds.data.shards import Manifest, ShardReader
from itpn_ds.engine.batch_norm import RankAveragedStats
from itpn_ds.engine.ema import WeightEma
from itpn_ds.engine.losses import MicroResult, Task, global_valid_count
from itpn_ds.engine.tasks.base import DenseFamily, Evaluator, Loaders, global_rank, register_task
from itpn_ds.errors import ConfigError

if TYPE_CHECKING:  # config.py imports the task modules: no import of config (nor runtime) at run time
    from itpn_ds.config import RunConfig
    from itpn_ds.engine.runtime import Runtime

METRICS = ("AP", "AP50", "AP75")  # COCOeval.stats[0:3]: IoU 0.50:0.95, 0.50, 0.75; all areas, 100 detections
MASK_THRESHOLD = 0.5              # torchvision's / mmdet's mask binarisation of the pasted mask probabilities


@dataclass
class DetectConfig(DetRecipe):
    """Detection / instance-segmentation fine-tuning (``task: detect``, ``itpn-ds detect``; docs/dense.md): the
    training pipeline's recipe (:class:`~itpn_ds.data.det_pipeline.DetRecipe`) and the task's keys.

    short_sides:       training: the shorter side (px) is drawn from these per image and epoch (published
                       480, 512, ..., 800), the longer capped at ``max_long_side`` (1333), keep ratio.
    flip_prob:         training horizontal-flip probability.
    crop_prob:         probability of the published DETR-style crop branch (mmdet's ``AutoAugment`` between its
                       two policies: 0.5): resize to a shorter side drawn from ``crop_short_sides`` (400, 500,
                       600), cut a crop whose height and width are drawn from ``crop_size`` [min, max] px (384-600,
                       each at most the image's), then the multi-scale resize above; 0 keeps only that resize.
    init:              checkpoint to start from, as ``finetune.init`` (a pre-training run: its backbone and
                       pyramid load, the heads start at init; a detection run or export: everything loads).
    eval_short_side, eval_max_long_side: evaluation resize (published 800, 1333).
    eval_every_epochs: COCO box / mask AP on ``data.val_shards`` every this many epochs and at the end; the
                       best box AP is exported to ``RUN_DIR/best``.
    sync_bn:           the box head's BatchNorm as SyncBatchNorm over the ranks when there are several and the
                       device is CUDA (the published SyncBN); elsewhere plain BN per rank, its running
                       statistics averaged over the ranks after every forward.
    The model's ``num_classes`` (``model.kwargs.num_classes``, counting the background) must be the shards'
    categories + 1.
    """

    init: str = ""
    eval_short_side: int = 800
    eval_max_long_side: int = 1333
    eval_every_epochs: int = 1
    sync_bn: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.eval_short_side, self.eval_max_long_side) < 1:
            raise ConfigError(f"detect.eval_short_side and detect.eval_max_long_side must be positive sizes in px, "
                              f"got {self.eval_short_side} and {self.eval_max_long_side}")


@register_task("detect")
class DetectFamily(DenseFamily):
    """Detection and instance segmentation (Mask R-CNN): COCO box / mask AP."""

    best_metric = "bbox_AP"
    shard_kind = DETECTION

    def section(self) -> DetectConfig:
        return self.cfg.detect

    def check_model(self, model: nn.Module, runtime: Runtime) -> None:
        check_detection_model(self.cfg, model, self.classes, self.classes_source)

    def flops_per_image(self, model: nn.Module) -> float:
        return 0.0  # images of their own sizes: no per-image FLOPs, so no MFU

    def loaders(self, rank: int, world_size: int, train: bool) -> Loaders:
        return build_detection_loaders(self.cfg, rank, world_size, train)

    def loss(self, device: torch.device) -> Task:
        return DetectTask()

    def evaluator(self, model: Any, loader: Loader, device: torch.device, autocast_dtype: torch.dtype | None,
                  ema: WeightEma | None) -> Evaluator:
        shards = self.cfg.data.val_shards
        # only rank 0 scores, so only rank 0 reads the ground truth
        ground_truth = coco_ground_truth(shards) if global_rank() == 0 else None
        split = ClassMap.of_manifest(self.manifests(train=False)["val_shards"])
        category_ids = split_category_ids(self.classes, split)
        return lambda: evaluate_detector(model, loader, device, ground_truth, category_ids)


# ------------------------------------------------------------------------------------------- checks

def check_detection_model(cfg: RunConfig, model: nn.Module, classes: ClassMap | None, source: str) -> None:
    """The model's classes (background included) must be the categories + 1 of the class map trained
    (``source``: data.shards, or the evaluated weights), and the run's precision one whose boxes torchvision can
    handle."""
    if cfg.deepspeed.precision != "fp32":
        raise ConfigError(f"task=detect with deepspeed.precision={cfg.deepspeed.precision}: the whole Mask R-CNN would "
                          "be cast, but its anchors, box decoding and NMS need fp32 (torchvision has no bf16 NMS); use "
                          "deepspeed.precision=fp32 with model.kwargs.backbone_autocast=bf16 (backbone in bf16, "
                          "heads in fp32)")
    outputs = model.roi_heads.box_predictor.cls_score.out_features
    if classes is not None and len(classes) + 1 != outputs:
        raise ConfigError(f"{source} has {len(classes)} categories but model {cfg.model.name} has "
                          f"num_classes={outputs} (the background included): set "
                          f"model.kwargs.num_classes={len(classes) + 1}")


def split_category_ids(trained: ClassMap, split: ClassMap) -> list[int | None]:
    """The evaluated split's category id of each training label 1..K, by class name (``split`` has only classes
    of ``trained``: ``class_map.align``); None for a class the split lacks (its detections are not scored)."""
    return [split.category_of(name) if name in split.ids else None for name in trained.names]


# ------------------------------------------------------------------------------------------ loaders

def build_detection_loaders(cfg: RunConfig, rank: int, world_size: int, train: bool = True) -> tuple[Any, Any]:
    """(multi-scale train loader with the ``detect`` section as its recipe, or None; evaluation loader or None)
    over ``data.shards`` / ``data.val_shards``."""
    from itpn_ds.data import build_detection_loader

    d, det = cfg.data, cfg.detect
    if train and not d.shards:
        raise ConfigError("data.shards is empty: give the detection shard directory (itpn-ds make-shards --kind detection)")
    common = dict(micro_batch=d.micro_batch, rank=rank, world_size=world_size, seed=cfg.schedule.seed,
                  num_threads=d.num_threads)
    train_loader = eval_loader = None
    if train:
        train_loader = build_detection_loader(d.shards, train=True, recipe=det, **common)
    if d.val_shards:
        eval_loader = build_detection_loader(d.val_shards, train=False, short_side=det.eval_short_side,
                                             max_long_side=det.eval_max_long_side, **common)
    return train_loader, eval_loader


# --------------------------------------------------------------------------------------------- loss

@dataclass
class DetectTask:
    """Sum of the Mask R-CNN losses of a ``DetectionBatch`` (module docstring); parts: the five losses. The box
    head's plain BatchNorm on several ranks (the CPU) has its running statistics averaged over the ranks after
    the forward (``engine/batch_norm.py``)."""

    name: str = "detect"
    _stats: RankAveragedStats = field(default_factory=RankAveragedStats, repr=False)

    def forward(self, model: nn.Module, batch: DetectionBatch) -> MicroResult:
        valid = batch.valid.bool().tolist()
        local = float(sum(valid))
        # A rank whose micro-batch is all padding still runs a forward (DeepSpeed's hooks and collectives), weight 0.
        keep = [i for i, ok in enumerate(valid) if ok] or [0]
        losses = model([batch.images[i] for i in keep], [batch.targets[i] for i in keep])
        self._stats(model)
        count = global_valid_count(torch.tensor(local, device=batch.images[0].device))
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        loss = sum(losses.values()) * (local * world / count.clamp(min=1))
        return MicroResult(loss, {name: value.detach() for name, value in losses.items()}, count)


# ------------------------------------------------------------------------------------- COCO metrics

def coco_ground_truth(shards: str | Path) -> dict[str, Any]:
    """The COCO dataset (``images``, ``annotations``, ``categories``) of a detection shard directory, from
    its instance records: original sizes, the file's boxes (clamped into the image), masks, areas and crowd
    flags; annotation ids renumbered 1..N."""
    manifest = Manifest.load(shards)
    reader = ShardReader(shards, manifest)
    images, annotations = [], []
    try:
        for index in range(len(reader)):
            record = json.loads(reader.annotation(index))
            images.append({"id": record["image_id"], "width": record["width"], "height": record["height"]})
            for instance in record["instances"]:
                annotations.append({"id": len(annotations) + 1, "image_id": record["image_id"],
                                    "category_id": instance["category_id"], "bbox": instance["bbox"],
                                    "area": instance["area"], "iscrowd": instance["iscrowd"],
                                    "segmentation": instance["segmentation"]})
    finally:
        reader.close()
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c} for c in manifest.category_ids]}


def coco_detections(output: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                    category_ids: list[int | None]) -> tuple[list[dict], list[dict]]:
    """One image's detections as COCO results (box, mask) in its original pixels; ``category_ids``: the
    category id of each label 1..K (None: not scored, a class the evaluated split lacks).

    output: torchvision's eval output for the resized image (``boxes`` (m, 4) xyxy, ``labels`` (m,) 1..K,
    ``scores`` (m,), ``masks`` (m, 1, h, w) probabilities); target: its ``image_id``, ``size`` (h, w) and
    ``orig_size`` (H, W). Boxes are scaled by (W / w, H / h); masks resized bilinearly to (H, W) and
    thresholded at 0.5, then RLE-encoded.
    """
    from pycocotools import mask as mask_utils

    if output["boxes"].shape[0] == 0:
        return [], []
    (h0, w0), (h, w) = target["orig_size"].tolist(), target["size"].tolist()
    boxes = output["boxes"].float().cpu() * torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h])
    boxes[:, 2:] -= boxes[:, :2]
    masks = F.interpolate(output["masks"].float().cpu(), size=(h0, w0), mode="bilinear", align_corners=False)
    binary = (masks[:, 0] > MASK_THRESHOLD).permute(1, 2, 0).numpy().astype(np.uint8)
    rles = mask_utils.encode(np.asfortranarray(binary))
    image_id = int(target["image_id"])
    boxes_out, masks_out = [], []
    for box, label, score, rle in zip(boxes.tolist(), output["labels"].tolist(), output["scores"].tolist(), rles):
        if category_ids[label - 1] is None:
            continue
        common = {"image_id": image_id, "category_id": category_ids[label - 1], "score": float(score)}
        boxes_out.append({**common, "bbox": [round(v, 2) for v in box]})
        masks_out.append({**common, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    return boxes_out, masks_out


def coco_metrics(ground_truth: dict[str, Any], boxes: list[dict], masks: list[dict]) -> dict[str, float]:
    """pycocotools' COCOeval of box and mask results against ``ground_truth`` (a COCO dataset dict):
    ``bbox_AP``, ``bbox_AP50``, ``bbox_AP75``, ``segm_AP``, ... in percent; 0 for an empty result list,
    -1 where there is no ground truth to score."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    metrics: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        for iou_type, results in (("bbox", boxes), ("segm", masks)):
            if not results:
                metrics.update({f"{iou_type}_{name}": 0.0 for name in METRICS})
                continue
            evaluator = COCOeval(gt, gt.loadRes([dict(r) for r in results]), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            for name, value in zip(METRICS, evaluator.stats[:3]):
                metrics[f"{iou_type}_{name}"] = 100.0 * float(value) if value >= 0 else -1.0
    return metrics


@torch.no_grad()
def evaluate_detector(model: nn.Module, loader: Any, device: torch.device, ground_truth: dict[str, Any] | None,
                      category_ids: list[int | None]) -> dict[str, float]:
    """COCO box / mask AP of ``model`` over a whole evaluation loader, all ranks together.

    Every rank predicts its share of the images, one image per forward (padding samples skipped); the
    results are gathered
    (``all_gather_object``) and rank 0 scores them against ``ground_truth`` (only rank 0 needs it);
    every rank returns the same metrics, plus ``images`` (the number evaluated).
    """
    was_training = model.training
    model.eval()
    boxes, masks, images = [], [], 0
    for batch in loader:
        batch = batch.to(device)
        # one image per forward: the backbone attends over the batch's padding, so batching images would make
        # the results depend on which images share a batch (and so on the world size); mmdet tests one per GPU
        outputs = [model([image])[0] for image in batch.images]
        for output, target, valid in zip(outputs, batch.targets, batch.valid.tolist()):
            if valid:
                b, m = coco_detections(output, target, category_ids)
                boxes += b
                masks += m
                images += 1
    model.train(was_training)
    parts = [(boxes, masks, images)]
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (boxes, masks, images))
    result: list[dict[str, float] | None] = [None]
    if not distributed or dist.get_rank() == 0:
        result[0] = {**coco_metrics(ground_truth, [r for p in parts for r in p[0]], [r for p in parts for r in p[1]]),
                     "images": float(sum(p[2] for p in parts))}
    if distributed:
        dist.broadcast_object_list(result, src=0)
    return result[0]
