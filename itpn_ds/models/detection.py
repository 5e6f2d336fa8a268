"""Detection and instance segmentation: torchvision's Mask R-CNN with the iTPN pyramid in place of the FPN.

The backbone adapter, the level pooler and the RoI-head stages are ours (``PyramidBackbone``: the five levels of the ``detection`` layout,
strides 4-64, 256 channels, as the OrderedDict torchvision's detection models take). ``mask_rcnn`` configures
torchvision's ``MaskRCNN`` as the published COCO configs (det/configs/itpn, mmdet's ``mask_rcnn_r50_fpn``
with the neck removed): one anchor size per level, 8 × its stride (32-512 px), aspect ratios 0.5 / 1 / 2;
box and mask RoIAlign (7 and 14 px, adaptive sampling) over the levels at strides 4-32, the RPN over all
five; the box head 4 convs (BatchNorm) + 1 fc of 1024 (mmdet's ``ConvFCBBoxHead`` 4conv1fc), the mask head 4
convs. The RoI head (``roi_head``) is ``itpn_ds.models.cascade``'s: one stage (Mask R-CNN) or three (Cascade
Mask R-CNN), with torchvision's smooth-L1 or the published GIoU box loss (``box_loss``), RoIAlign with or
without mmcv's half-pixel alignment (``roi_aligned``). The model's transform normalises the images and pads the batch to a multiple of the coarsest stride
(64); it resizes them only with ``resize=True`` (short side from ``min_size``, one picked at random per
batch in training, long side ≤ ``max_size``): the detection loaders (``itpn_ds.data.det_pipeline``) already
apply the published multi-scale resize. ``backbone_autocast`` (``bf16`` / ``fp16``) runs the backbone under
autocast and hands the heads fp32 levels, so anchors, box decoding, NMS and RoIAlign stay in fp32 (mmdet's
``force_fp32`` heads; torchvision's CPU NMS has no bf16 kernel, and bf16 box coordinates at 1333 px would be
quantised to 8 px): train such a model with fp32 weights (``deepspeed.precision=fp32``).
Differences from the published detector: docs/dense.md.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision import ops
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import initLevelMapper

from itpn_ds.models.cascade import ROI_HEADS, AgnosticBoxPredictor, MultiStageRoIHeads, StageParts
from itpn_ds.models.dense import DenseTaskModel

LEVEL_NAMES = ("0", "1", "2", "3", "pool")  # torchvision's FPN names: strides 4, 8, 16, 32 and the extra 64
ROI_LEVELS = LEVEL_NAMES[:4]                # RoIAlign over strides 4-32 (mmdet's featmap_strides)
ANCHOR_SCALE = 8                            # anchor side = 8 × the level's stride
ASPECT_RATIOS = (0.5, 1.0, 2.0)
BOX_REPRESENTATION = 1024                   # the box head's fc width
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MULTI_SCALE_SHORT_SIDES = tuple(range(480, 801, 32))  # DETR-style multi-scale training, 800 at test


class PyramidBackbone(nn.Module):
    """torchvision's detection-backbone interface over a dense iTPN in the ``detection`` layout.

    forward: images (B, 3, H, W), sides multiples of 64 -> OrderedDict ``LEVEL_NAMES`` -> (B, 256, H/s, W/s),
    s = 4, 8, 16, 32, 64; ``out_channels`` = 256 (the pyramid's ``fpn_dim``). ``autocast``: run the body under
    autocast in that dtype (``bf16`` / ``fp16``) and return fp32 levels; None: the body's own dtype.
    """

    def __init__(self, body: nn.Module, autocast: str | None = None):
        super().__init__()
        info = body.feature_info
        channels = {i["num_chs"] for i in info}
        if len(info) != len(LEVEL_NAMES) or len(channels) != 1:
            raise ValueError(f"Mask R-CNN needs the detection layout (5 levels of one width); the backbone gives "
                             f"{[(i['num_chs'], i['reduction']) for i in info]} (channels, stride): build it with "
                             "layout='detection'")
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"backbone_autocast must be one of {', '.join(AUTOCAST_DTYPES)} or None, got {autocast!r}")
        self.body = body
        self.autocast = autocast
        self.out_channels = channels.pop()
        self.strides = tuple(i["reduction"] for i in info)

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if self.autocast is None:
            return OrderedDict(zip(LEVEL_NAMES, self.body(images)))
        with torch.autocast(images.device.type, dtype=AUTOCAST_DTYPES[self.autocast]):
            levels = self.body(images)
        return OrderedDict((name, level.float()) for name, level in zip(LEVEL_NAMES, levels))


class LevelRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` over ``ROI_LEVELS`` with its level scales (1 / stride) and RoI-to-level
    mapping set from ``strides`` (powers of 2), and mmcv's ``aligned`` option.

    torchvision otherwise infers and keeps the scales from the first batch it sees, rounding feature height /
    image height to a power of 2: an image whose padding to the coarsest stride (64) adds more than 41 % of its
    height (a 70 px high image, padded to 128) sets every scale one octave off for the model's lifetime, so
    the same weights detect well or not at all depending on the first image after construction.
    ``aligned=True`` samples at pixel centres (box coordinates × scale − 0.5: mmcv's ``RoIAlign(aligned=True)``,
    the published configs'); torchvision's ``MultiScaleRoIAlign`` always pools with ``aligned=False``.

    forward: levels {name: (B, C, H_l, W_l)}, boxes [(n_i, 4) xyxy image px] -> (Σ n_i, C, out, out).
    """

    def __init__(self, strides: Sequence[int], output_size: int, aligned: bool = False):
        super().__init__(list(ROI_LEVELS), output_size=output_size, sampling_ratio=0)
        self.aligned = aligned
        self.scales = [1.0 / s for s in strides]
        self.map_levels = initLevelMapper(int(math.log2(strides[0])), int(math.log2(strides[-1])),
                                          canonical_scale=self.canonical_scale, canonical_level=self.canonical_level)

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        levels = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        level_of = self.map_levels(boxes)
        out = levels[0].new_zeros((len(rois), levels[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(levels, self.scales)):
            index = torch.where(level_of == level)[0]
            out[index] = ops.roi_align(feature, rois[index], self.output_size, spatial_scale=scale,
                                       sampling_ratio=self.sampling_ratio, aligned=self.aligned).to(out.dtype)
        return out


class PadOnlyTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without its resize: normalise, pad to ``size_divisible``, and map
    detections back to the (unchanged) input sizes. For images the data loader has already resized."""

    def resize(self, image: torch.Tensor, target: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        return image, target


class ITPNMaskRCNN(DenseTaskModel, MaskRCNN):
    """torchvision's ``MaskRCNN`` with the layer-decay metadata of the dense backbone (``DenseTaskModel``).

    forward (torchvision's contract): a list of images (3, H_i, W_i) in [0, 1] of any sizes, and in training
    targets [{"boxes" (n, 4) xyxy px, "labels" (n,) int64 in 1..num_classes-1, "masks" (n, H_i, W_i) uint8}]
    -> training: dict of the five losses; eval: [{"boxes", "labels", "scores", "masks" (m, 1, H_i, W_i)}].
    """

    backbone_prefix = "backbone.body."


def mask_rcnn(backbone: nn.Module, num_classes: int = 81, min_size: int | Sequence[int] = MULTI_SCALE_SHORT_SIDES,
              max_size: int = 1333, image_mean: Sequence[float] | None = None,
              image_std: Sequence[float] | None = None, resize: bool = False,
              backbone_autocast: str | None = None, roi_head: str = "standard", box_loss: str = "smooth_l1",
              roi_aligned: bool = False, class_agnostic: bool = False,
              detector_kwargs: dict | None = None) -> ITPNMaskRCNN:
    """Mask R-CNN, or Cascade Mask R-CNN, on a dense backbone in the ``detection`` layout.

    ``num_classes`` counts the background (81: COCO's 80 + background). ``image_mean`` / ``image_std``:
    torchvision's (ImageNet) by default. ``resize``: let the model's transform resize by ``min_size`` /
    ``max_size`` (False: the images come resized, ``PadOnlyTransform``). ``backbone_autocast``: ``bf16`` /
    ``fp16`` to run the backbone under autocast, the heads in fp32 (``PyramidBackbone``). The RoI head
    (``itpn_ds.models.cascade``): ``roi_head`` ``standard`` (one stage: Mask R-CNN) or ``cascade`` (three
    stages: Cascade Mask R-CNN); ``box_loss`` ``smooth_l1`` (torchvision's) or ``giou`` (the published: weight
    10 on decoded boxes); ``roi_aligned``: RoIAlign at pixel centres (mmcv's ``aligned=True``, the published);
    ``class_agnostic``: one box per RoI instead of one per class. ``detector_kwargs``: any other ``MaskRCNN``
    argument (RPN / RoI sampling, score threshold, detections per image).
    """
    if roi_head not in ROI_HEADS:
        raise ValueError(f"roi_head must be one of {', '.join(ROI_HEADS)}, got {roi_head!r}")
    adapter = PyramidBackbone(backbone, autocast=backbone_autocast)
    width = adapter.out_channels
    anchors = AnchorGenerator(sizes=tuple((ANCHOR_SCALE * s,) for s in adapter.strides),
                              aspect_ratios=(ASPECT_RATIOS,) * len(adapter.strides))
    predictor = AgnosticBoxPredictor if class_agnostic else FastRCNNPredictor
    parts = StageParts(
        box_head=lambda: FastRCNNConvFCHead((width, 7, 7), [width] * 4, [BOX_REPRESENTATION], norm_layer=nn.BatchNorm2d),
        box_predictor=lambda: predictor(BOX_REPRESENTATION, num_classes),
        mask_head=lambda: MaskRCNNHeads(width, [width] * 4, 1),
        mask_predictor=lambda: MaskRCNNPredictor(width, width, num_classes))
    stages = ROI_HEADS[roi_head]
    roi_strides = adapter.strides[:len(ROI_LEVELS)]
    box_head = parts.box_head()
    model = ITPNMaskRCNN(
        adapter, None, min_size=min_size, max_size=max_size, image_mean=image_mean, image_std=image_std,
        rpn_anchor_generator=anchors,
        box_roi_pool=LevelRoIAlign(roi_strides, 7, aligned=roi_aligned),
        box_head=box_head,
        box_predictor=parts.box_predictor(),
        mask_roi_pool=LevelRoIAlign(roi_strides, 14, aligned=roi_aligned),
        mask_head=parts.mask_head(),
        mask_predictor=parts.mask_predictor(),
        size_divisible=adapter.strides[-1],
        box_fg_iou_thresh=stages[0].iou, box_bg_iou_thresh=stages[0].iou, bbox_reg_weights=stages[0].coder_weights,
        **(detector_kwargs or {}))
    model.roi_heads = MultiStageRoIHeads.around(model.roi_heads, stages, parts, box_loss, class_agnostic)
    if not resize:
        t = model.transform
        model.transform = PadOnlyTransform(t.min_size, t.max_size, t.image_mean, t.image_std,
                                           size_divisible=t.size_divisible)
    return model
