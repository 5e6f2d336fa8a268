"""The RoI heads of the detectors (itpn_ds/models/cascade.py, docs/dense.md "Cascade Mask R-CNN"): the
one-stage head is torchvision's Mask R-CNN head to the bit, the GIoU box loss and the aligned RoIAlign against
computations by hand, the cascade's stages in training and test."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads

from itpn_ds.models import create_model
from itpn_ds.models.cascade import GIOU_WEIGHT, MultiStageRoIHeads, RoIStage, Samples
from itpn_ds.models.detection import LevelRoIAlign

TINY = dict(img_size=64, embed_dim=64, mlp_depth1=1, mlp_depth2=1, depth=2, num_heads=2, fpn_dim=32, num_classes=5,
            detector_kwargs=dict(rpn_pre_nms_top_n_train=60, rpn_post_nms_top_n_train=40, rpn_pre_nms_top_n_test=40,
                                 rpn_post_nms_top_n_test=30, box_batch_size_per_image=32))


def images_and_targets(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 128, 192, generator=g), torch.rand(3, 128, 128, generator=g)]
    targets = []
    for image in images:
        h, w = image.shape[1:]
        boxes = torch.tensor([[10.0, 12.0, 70.0, 60.0], [60.0, 40.0, 120.0, 110.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            m[y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 3]), "masks": masks})
    return images, targets


def torchvision_heads(heads: MultiStageRoIHeads) -> RoIHeads:
    """torchvision's own RoIHeads holding the same modules and settings as a one-stage head."""
    tv = RoIHeads(heads.box_roi_pool, heads.box_head, heads.box_predictor, 0.5, 0.5,
                  heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
                  heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
                  mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head, mask_predictor=heads.mask_predictor)
    return tv


def test_the_one_stage_head_is_torchvisions_mask_rcnn_head_to_the_bit():
    torch.manual_seed(0)
    model = create_model("mask_rcnn_itpn_base_3324", **TINY)
    images, targets = images_and_targets()
    reference = copy.deepcopy(model)
    reference.roi_heads = torchvision_heads(reference.roi_heads)
    for train in (True, False):
        model.train(train), reference.train(train)
        torch.manual_seed(1)
        ours = model(images, targets) if train else model(images)
        torch.manual_seed(1)
        theirs = reference(images, targets) if train else reference(images)
        if train:
            assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours), (ours, theirs)
        else:
            for a, b in zip(ours, theirs):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- GIoU loss

def giou_by_hand(a: list[float], b: list[float]) -> float:
    """GIoU of two xyxy boxes from the formula: IoU − (C − U) / C, C the smallest enclosing box's area."""
    area = lambda x1, y1, x2, y2: max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    hull = area(min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
    return inter / union - (hull - union) / hull


def decode_by_hand(delta: list[float], roi: list[float], stds: tuple[float, ...]) -> list[float]:
    """mmdet's DeltaXYWHBBoxCoder.decode (means 0): centre moved by dx·std·w, size scaled by exp(dw·std)."""
    w, h = roi[2] - roi[0], roi[3] - roi[1]
    cx, cy = roi[0] + w / 2 + delta[0] * stds[0] * w, roi[1] + h / 2 + delta[1] * stds[1] * h
    w, h = w * math.exp(delta[2] * stds[2]), h * math.exp(delta[3] * stds[3])
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


@pytest.mark.parametrize("class_agnostic", [False, True])
def test_giou_box_loss_is_ten_times_one_minus_giou_of_the_decoded_boxes_over_the_sampled_rois(class_agnostic):
    stage = RoIStage(0.6, (0.05, 0.05, 0.1, 0.1))
    heads = MultiStageRoIHeads([stage], None, None, None, box_loss="giou", class_agnostic=class_agnostic,
                               first=(torch.nn.Identity(),) * 4)
    rois = [[10.0, 10.0, 50.0, 40.0], [0.0, 0.0, 20.0, 20.0], [30.0, 5.0, 90.0, 70.0]]
    gts = [[12.0, 8.0, 55.0, 44.0], [0.0, 0.0, 1.0, 1.0], [25.0, 10.0, 80.0, 75.0]]
    labels = [2, 0, 1]  # the second RoI is background: no box loss
    k = 3
    deltas = torch.tensor([[0.3, -0.2, 0.5, -0.4], [9.0, 9.0, 9.0, 9.0], [-0.6, 0.1, -0.3, 0.2]])
    if class_agnostic:
        predicted = deltas
    else:  # each RoI's deltas in its label's slot, noise elsewhere
        predicted = torch.randn(3, 4 * k)
        for i, label in enumerate(labels):
            predicted[i, 4 * label:4 * label + 4] = deltas[i]
    samples = Samples(proposals=[torch.tensor(rois)], labels=[torch.tensor(labels)],
                      matched_boxes=[torch.tensor(gts)])
    _, loss = heads.box_losses(heads, torch.zeros(3, k), predicted, samples)
    expected = sum(GIOU_WEIGHT * (1 - giou_by_hand(decode_by_hand(deltas[i].tolist(), rois[i], stage.stds), gts[i]))
                   for i in (0, 2)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------- RoIAlign

def bilinear(feature: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """(C, H, W) at a real position, pixel (i, j) centred at (i, j) (RoIAlign's interpolation, inside the map)."""
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * feature[:, y0, x0] + (1 - ly) * lx * feature[:, y0, x0 + 1]
            + ly * (1 - lx) * feature[:, y0 + 1, x0] + ly * lx * feature[:, y0 + 1, x0 + 1])


def roi_align_by_hand(feature: torch.Tensor, box: list[float], scale: float, out: int, aligned: bool) -> torch.Tensor:
    """Average of bilinear samples on a regular grid in each output bin, sampling_ratio = ceil(bin size) as
    RoIAlign's adaptive rule; ``aligned`` moves the box by −0.5 px of the feature map (mmcv's pixel-centre model)."""
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (v * scale - offset for v in box)
    bin_w, bin_h = (x2 - x1) / out, (y2 - y1) / out
    ny, nx = math.ceil(bin_h), math.ceil(bin_w)
    result = torch.zeros(feature.shape[0], out, out, dtype=torch.float64)
    for i in range(out):
        for j in range(out):
            samples = [bilinear(feature, y1 + (i + (a + 0.5) / ny) * bin_h, x1 + (j + (b + 0.5) / nx) * bin_w)
                       for a in range(ny) for b in range(nx)]
            result[:, i, j] = torch.stack(samples).mean(0)
    return result


def test_aligned_roi_align_samples_at_pixel_centres_on_the_level_of_the_box():
    torch.manual_seed(0)
    strides = (4, 8, 16, 32)
    features = {name: torch.randn(1, 3, 256 // s, 256 // s, dtype=torch.float64)
                for name, s in zip(("0", "1", "2", "3"), strides)}
    small, large = [30.0, 40.0, 70.0, 90.0], [20.0, 30.0, 180.0, 200.0]  # sqrt(area) 45 -> level 0; 165 -> level 1
    boxes = [torch.tensor([small, large], dtype=torch.float64)]
    for aligned in (True, False):
        pooled = LevelRoIAlign(strides, 7, aligned=aligned)(features, boxes, [(256, 256)])
        assert torch.allclose(pooled[0], roi_align_by_hand(features["0"][0], small, 1 / 4, 7, aligned), atol=1e-9)
        assert torch.allclose(pooled[1], roi_align_by_hand(features["1"][0], large, 1 / 8, 7, aligned), atol=1e-9)
    # aligned=False is torchvision's MultiScaleRoIAlign with the same level scales
    from torchvision.ops import MultiScaleRoIAlign

    theirs = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 0)
    ours = LevelRoIAlign(strides, 7)
    theirs.scales, theirs.map_levels = ours.scales, ours.map_levels
    assert torch.equal(ours(features, boxes, [(256, 256)]), theirs(features, boxes, [(256, 256)]))


# ------------------------------------------------------------------------------------------- the cascade

def test_cascade_trains_three_weighted_stages_and_tests_on_the_averaged_scores():
    torch.manual_seed(0)
    model = create_model("cascade_mask_rcnn_itpn_base_3324", **TINY, box_loss="giou", roi_aligned=True)
    heads = model.roi_heads
    assert [s.proposal_matcher.high_threshold for s in heads.stages()] == [0.5, 0.6, 0.7]
    assert heads.stage_weights == (1.0, 0.5, 0.25)
    assert [tuple(round(1 / w, 3) for w in s.box_coder.weights) for s in heads.stages()] == \
        [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)]
    assert heads.box_predictor.bbox_pred.out_features == 4  # class-agnostic by default (mmdet's cascade)
    images, targets = images_and_targets()
    losses = model(images, targets)
    assert sorted(losses) == sorted([f"loss_{n}_s{i}" for n in ("classifier", "box_reg", "mask") for i in range(3)]
                                    + ["loss_objectness", "loss_rpn_box_reg"])
    sum(losses.values()).backward()
    assert all(s.box_head[0][0].weight.grad.abs().sum() > 0 for s in heads.stages())
    assert all(s.mask_head[0][0].weight.grad.abs().sum() > 0 for s in heads.stages())
    model.eval()
    with torch.no_grad():
        detections = model(images)
    for image, d in zip(images, detections):
        assert d["boxes"].shape[0] == d["scores"].shape[0] == d["masks"].shape[0] <= 100
        assert d["masks"].shape[1:] == (1, *image.shape[1:]) and 0 <= d["masks"].min() and d["masks"].max() <= 1
