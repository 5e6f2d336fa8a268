"""Multi-stage RoI heads on torchvision's parts: mmdet's ``StandardRoIHead`` (one stage, Mask R-CNN) and
``CascadeRoIHead`` (three stages, Cascade Mask R-CNN) as one module.

Each stage is a torchvision ``RoIHeads`` (its box head and predictor, mask head and predictor, proposal matcher
at the stage's IoU, balanced sampler and box coder of the stage's target stds); ``MultiStageRoIHeads`` *is*
stage 0, so a one-stage head has torchvision's Mask R-CNN parameter names and, with the smooth-L1 box loss, its
numbers (tested), and later stages sit in ``later_stages``. As mmdet's ``CascadeRoIHead``
(det/mmdet/models/roi_heads/cascade_roi_head.py of the published code):

* training, stage by stage: the ground-truth boxes join the proposals, each proposal is matched at the stage's
  IoU (positive and negative thresholds equal, no low-quality matches) and 512 are sampled (25 % positive:
  ``box_batch_size_per_image`` / ``box_positive_fraction``); the box head's classification and box losses and
  the stage's mask loss (on its positives) count ``weight`` times; the sampled RoIs, less the ground-truth boxes,
  regressed by the stage's deltas (of their label; a negative's by its best foreground class) and clipped to the
  image, are the next stage's proposals (no gradient through them);
* test: each stage regresses the last one's boxes; the class logits of all stages are averaged, softmaxed and
  decoded with the last stage's deltas (score threshold, per-class NMS, top detections: torchvision's
  ``postprocess_detections``); the mask probabilities of every stage's mask head are averaged for those boxes.

Box losses (``box_loss``): ``smooth_l1`` (torchvision's: smooth L1, beta 1/9, on encoded deltas) or ``giou``
(mmdet's ``GIoULoss`` with ``reg_decoded_bbox=True``: weight 10 × (1 − GIoU) of the decoded box against its
ground truth); either summed over the positive RoIs and divided by all sampled RoIs. ``class_agnostic``: one
box per RoI (mmdet's ``reg_class_agnostic``) instead of one per class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss

BOX_LOSSES = ("smooth_l1", "giou")
GIOU_WEIGHT = 10.0        # the published configs' GIoULoss(loss_weight=10.0)
SMOOTH_L1_BETA = 1.0 / 9  # torchvision's fastrcnn_loss


@dataclass(frozen=True)
class RoIStage:
    """One stage: ``iou`` the positive / negative threshold of its matcher, ``stds`` the box coder's target stds
    (x, y, w, h; torchvision's coder weights are their inverses), ``weight`` its losses' weight."""

    iou: float
    stds: tuple[float, float, float, float]
    weight: float = 1.0

    @property
    def coder_weights(self) -> tuple[float, ...]:
        return tuple(1.0 / s for s in self.stds)


# mmdet's StandardRoIHead and CascadeRoIHead as the published configs set them (mask_rcnn_r50_fpn.py,
# cascade_mask_rcnn_vit_fpn.py: IoU 0.5 / 0.6 / 0.7, stage loss weights 1 / 0.5 / 0.25).
ROI_HEADS: dict[str, tuple[RoIStage, ...]] = {
    "standard": (RoIStage(0.5, (0.1, 0.1, 0.2, 0.2)),),
    "cascade": (RoIStage(0.5, (0.1, 0.1, 0.2, 0.2), 1.0), RoIStage(0.6, (0.05, 0.05, 0.1, 0.1), 0.5),
                RoIStage(0.7, (0.033, 0.033, 0.067, 0.067), 0.25)),
}


class AgnosticBoxPredictor(FastRCNNPredictor):
    """torchvision's ``FastRCNNPredictor`` with one box per RoI: (N, C) -> class logits (N, K), deltas (N, 4)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)


@dataclass
class StageParts:
    """Builders of one stage's modules (called in this order for every stage)."""

    box_head: Callable[[], nn.Module]
    box_predictor: Callable[[], nn.Module]
    mask_head: Callable[[], nn.Module]
    mask_predictor: Callable[[], nn.Module]


@dataclass
class Samples:
    """One stage's sampled RoIs per image: boxes (n, 4), labels (n,) (0 = background), the index of the matched
    ground truth (n,), its box (n, 4), and whether the RoI is a ground-truth box (n,) bool."""

    proposals: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    matched_idxs: list[torch.Tensor] = field(default_factory=list)
    matched_boxes: list[torch.Tensor] = field(default_factory=list)
    is_gt: list[torch.Tensor] = field(default_factory=list)


class MultiStageRoIHeads(RoIHeads):
    """``len(stages)`` box + mask stages (module docstring); stage 0 is this module, the others
    ``later_stages``. forward: torchvision's ``RoIHeads`` contract (features, proposals, image sizes, targets ->
    (detections, losses)); loss names ``loss_classifier``, ``loss_box_reg``, ``loss_mask``, suffixed ``_s{i}``
    per stage when there are several."""

    def __init__(self, stages: Sequence[RoIStage], parts: StageParts, box_roi_pool: nn.Module,
                 mask_roi_pool: nn.Module, batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 box_loss: str = "smooth_l1", class_agnostic: bool = False, first: tuple[nn.Module, ...] = ()):
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {', '.join(BOX_LOSSES)}, got {box_loss!r}")

        def stage_heads(stage: RoIStage, modules: tuple[nn.Module, ...] = ()) -> dict:
            box_head, box_predictor, mask_head, mask_predictor = modules or (
                parts.box_head(), parts.box_predictor(), parts.mask_head(), parts.mask_predictor())
            return dict(box_roi_pool=box_roi_pool, box_head=box_head, box_predictor=box_predictor,
                        fg_iou_thresh=stage.iou, bg_iou_thresh=stage.iou, batch_size_per_image=batch_size_per_image,
                        positive_fraction=positive_fraction, bbox_reg_weights=stage.coder_weights,
                        score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                        mask_roi_pool=mask_roi_pool, mask_head=mask_head, mask_predictor=mask_predictor)

        super().__init__(**stage_heads(stages[0], first))
        self.later_stages = nn.ModuleList(RoIHeads(**stage_heads(s)) for s in stages[1:])
        self.stage_weights = tuple(s.weight for s in stages)
        self.box_loss = box_loss
        self.class_agnostic = class_agnostic

    @classmethod
    def around(cls, heads: RoIHeads, stages: Sequence[RoIStage], parts: StageParts, box_loss: str,
               class_agnostic: bool) -> "MultiStageRoIHeads":
        """The multi-stage head whose stage 0 is torchvision's ``heads`` (its modules and sampling settings)."""
        return cls(stages, parts, heads.box_roi_pool, heads.mask_roi_pool,
                   heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
                   heads.score_thresh, heads.nms_thresh, heads.detections_per_img, box_loss, class_agnostic,
                   first=(heads.box_head, heads.box_predictor, heads.mask_head, heads.mask_predictor))

    def stages(self) -> list[RoIHeads]:
        return [self, *self.later_stages]

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]], targets: list[dict[str, torch.Tensor]] | None = None
                ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        stages = self.stages()
        suffix = (lambda i: f"_s{i}") if len(stages) > 1 else (lambda i: "")
        losses: dict[str, torch.Tensor] = {}
        logits_per_stage: list[torch.Tensor] = []
        samples = None
        for i, (stage, weight) in enumerate(zip(stages, self.stage_weights)):
            if self.training:
                samples = sample_rois(stage, proposals, targets)
                proposals = samples.proposals
            logits, deltas = stage.box_predictor(stage.box_head(stage.box_roi_pool(features, proposals, image_shapes)))
            if self.training:
                cls_loss, box_loss = self.box_losses(stage, logits, deltas, samples)
                losses[f"loss_classifier{suffix(i)}"] = weight * cls_loss
                losses[f"loss_box_reg{suffix(i)}"] = weight * box_loss
                losses[f"loss_mask{suffix(i)}"] = weight * mask_loss(stage, features, image_shapes, samples, targets)
            else:
                logits_per_stage.append(logits)
            if i < len(stages) - 1:
                proposals = self.refine(stage, logits, deltas, proposals, image_shapes, samples)
        if self.training:
            return [], losses
        return self.detect(features, logits_per_stage, deltas, proposals, image_shapes), losses

    def box_losses(self, stage: RoIHeads, logits: torch.Tensor, deltas: torch.Tensor,
                   samples: Samples) -> tuple[torch.Tensor, torch.Tensor]:
        """(classification cross-entropy, box loss) of one stage's sampled RoIs (module docstring)."""
        labels = torch.cat(samples.labels)
        cls_loss = F.cross_entropy(logits, labels)
        pos = torch.where(labels > 0)[0]
        picked = self.deltas_of(deltas, labels)[pos]
        if self.box_loss == "smooth_l1":
            targets = torch.cat(stage.box_coder.encode(samples.matched_boxes, samples.proposals))[pos]
            box = F.smooth_l1_loss(picked, targets, beta=SMOOTH_L1_BETA, reduction="sum")
        else:
            decoded = stage.box_coder.decode_single(picked, torch.cat(samples.proposals)[pos])
            box = GIOU_WEIGHT * generalized_box_iou_loss(decoded, torch.cat(samples.matched_boxes)[pos], reduction="sum")
        return cls_loss, box / labels.numel()

    def deltas_of(self, deltas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, 4 K) or (N, 4) deltas -> (N, 4): each RoI's deltas for its label (class-specific), or the one set."""
        if self.class_agnostic:
            return deltas
        return deltas.reshape(deltas.shape[0], -1, 4)[torch.arange(deltas.shape[0], device=deltas.device), labels]

    @torch.no_grad()
    def refine(self, stage: RoIHeads, logits: torch.Tensor, deltas: torch.Tensor, proposals: list[torch.Tensor],
               image_shapes: list[tuple[int, int]], samples: Samples | None) -> list[torch.Tensor]:
        """The next stage's proposals: each RoI regressed by this stage's deltas of its label (in training a
        positive's ground-truth label; otherwise the best foreground class), clipped to its image; in training
        the ground-truth RoIs are left out (mmdet's ``refine_bboxes``)."""
        best = logits[:, 1:].argmax(dim=1) + 1
        labels = torch.cat(samples.labels) if samples is not None else best
        labels = torch.where(labels > 0, labels, best)
        boxes = stage.box_coder.decode_single(self.deltas_of(deltas, labels), torch.cat(proposals))
        refined = []
        for i, (per_image, shape) in enumerate(zip(boxes.split([len(p) for p in proposals]), image_shapes)):
            per_image = box_ops.clip_boxes_to_image(per_image, shape)
            refined.append(per_image[~samples.is_gt[i]] if samples is not None else per_image)
        return refined

    def detect(self, features: dict[str, torch.Tensor], logits_per_stage: list[torch.Tensor], deltas: torch.Tensor,
               proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """Detections from the stages' averaged class logits and the last stage's deltas, with the stages'
        averaged mask probabilities."""
        last = self.stages()[-1]
        logits = sum(logits_per_stage) / len(logits_per_stage)
        per_class = deltas.repeat(1, logits.shape[1]) if self.class_agnostic else deltas
        boxes, scores, labels = last.postprocess_detections(logits, per_class, proposals, image_shapes)
        masks = [maskrcnn_inference(stage.mask_predictor(stage.mask_head(stage.mask_roi_pool(features, boxes, image_shapes))),
                                    labels) for stage in self.stages()]
        return [{"boxes": b, "labels": lab, "scores": s, "masks": sum(m) / len(m)}
                for b, lab, s, *m in zip(boxes, labels, scores, *masks)]


def sample_rois(stage: RoIHeads, proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> Samples:
    """torchvision's ``select_training_samples`` of ``stage`` (ground truth added to the proposals, matched at the
    stage's IoU, sampled), keeping which RoIs are ground-truth boxes."""
    stage.check_targets(targets)
    dtype = proposals[0].dtype
    gt_boxes = [t["boxes"].to(dtype) for t in targets]
    counts = [len(p) for p in proposals]
    proposals = stage.add_gt_proposals(proposals, gt_boxes)
    matched_idxs, labels = stage.assign_targets_to_proposals(proposals, gt_boxes, [t["labels"] for t in targets])
    out = Samples()
    for i, keep in enumerate(stage.subsample(labels)):
        gt = gt_boxes[i] if gt_boxes[i].numel() else torch.zeros((1, 4), dtype=dtype, device=proposals[i].device)
        out.proposals.append(proposals[i][keep])
        out.labels.append(labels[i][keep])
        out.matched_idxs.append(matched_idxs[i][keep])
        out.matched_boxes.append(gt[matched_idxs[i][keep]])
        out.is_gt.append(keep >= counts[i])
    return out


def mask_loss(stage: RoIHeads, features: dict[str, torch.Tensor], image_shapes: list[tuple[int, int]],
              samples: Samples, targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """torchvision's mask loss of ``stage``'s mask head on the stage's positive RoIs."""
    positive = [torch.where(labels > 0)[0] for labels in samples.labels]
    rois = [p[k] for p, k in zip(samples.proposals, positive)]
    logits = stage.mask_predictor(stage.mask_head(stage.mask_roi_pool(features, rois, image_shapes)))
    return maskrcnn_loss(logits, rois, [t["masks"] for t in targets], [t["labels"] for t in targets],
                         [m[k] for m, k in zip(samples.matched_idxs, positive)])
