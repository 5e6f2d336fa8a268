"""Detection fine-tuning on the engine (docs/dense.md, "Detection fine-tuning"): the step schedule, COCO
box / mask AP on hand-made detections with known answers and on the loader's own targets mapped back to
the original images, and the chains: the session's tiny pre-training -> Mask R-CNN fine-tuning on 2 ranks
(Cascade Mask R-CNN: one rank at the same global batch) -> evaluate -> export -> timm ``features_only``. Whether the
pre-trained pyramid detects better than random init is measured, over seeds, by
``benchmarks/dense_pretrained_vs_random.py`` (docs/dense.md)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from itpn_ds.cli import main as cli
from itpn_ds.config import load_config
from itpn_ds.data import build_detection_loader
from itpn_ds.data.shards import Manifest
from itpn_ds.engine.tasks.detect import coco_detections, coco_ground_truth, coco_metrics
from itpn_ds.engine.schedule import StepSchedule, build_schedule
from itpn_ds.models import create_model
from tests.fixtures.cli import itpn_ds_cli, itpn_ds_in_process, run_in_process

EVAL = re.compile(r"eval after epoch (\d+): (\{.*\})")
DETECT_EPOCHS = 6  # 12 steps of 2 x 2 images each (48 training images)


# ------------------------------------------------------------------------------------------- schedule

def test_step_schedule_warms_up_then_drops_by_gamma_at_each_milestone_epoch():
    cfg = load_config("tiny_detect_cpu", ["optim.lr=1.0", "optim.warmup_steps=2", "optim.lr_step_epochs=[2, 2.5]"])
    schedule = build_schedule(cfg.optim, steps_per_epoch=10, total_steps=40)
    assert isinstance(schedule, StepSchedule) and schedule.milestones == (20, 25)
    lrs = [schedule.lr_at(s) for s in range(40)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[19] == 1.0
    assert lrs[20] == pytest.approx(0.1) and lrs[24] == pytest.approx(0.1) and lrs[25] == pytest.approx(0.01)
    assert schedule.weight_decay_at(0) == schedule.weight_decay_at(39) == 0.05  # constant, as published


# ------------------------------------------------------------------------------------- COCO metrics

def square_mask(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    x, y, bw, bh = box
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[y:y + bh, x:x + bw] = 1
    return mask


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask))
    return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}


def hand_made_set() -> tuple[dict, list[dict], list[dict]]:
    """Two 80x100 images with one instance each (categories 3 and 7 of the file) and perfect results."""
    boxes = {1: (10, 20, 30, 40), 2: (50, 5, 40, 25)}
    categories = {1: 3, 2: 7}
    gt = {"images": [{"id": i, "width": 100, "height": 80} for i in boxes],
          "categories": [{"id": 3}, {"id": 7}], "annotations": []}
    box_results, mask_results = [], []
    for i, box in boxes.items():
        mask = square_mask(80, 100, box)
        gt["annotations"].append({"id": i, "image_id": i, "category_id": categories[i], "bbox": list(box),
                                  "area": int(mask.sum()), "iscrowd": 0, "segmentation": rle(mask)})
        box_results.append({"image_id": i, "category_id": categories[i], "score": 0.9, "bbox": list(box)})
        mask_results.append({"image_id": i, "category_id": categories[i], "score": 0.9, "segmentation": rle(mask)})
    return gt, box_results, mask_results


def test_coco_metrics_of_hand_made_detections_have_the_known_values():
    gt, boxes, masks = hand_made_set()
    perfect = coco_metrics(gt, boxes, masks)
    assert perfect == pytest.approx({f"{t}_{m}": 100.0 for t in ("bbox", "segm") for m in ("AP", "AP50", "AP75")})
    # one of the two instances missed: recall 0.5 at precision 1 -> 51 of COCO's 101 recall points, for each
    # category (one found, one not) averaged: (100 + 0) / 2
    half = coco_metrics(gt, boxes[:1], masks[:1])
    assert half["bbox_AP"] == pytest.approx(50.0) and half["segm_AP50"] == pytest.approx(50.0)
    # the same two boxes with the categories swapped: nothing is right
    swapped = [{**b, "category_id": 10 - b["category_id"]} for b in boxes]
    assert coco_metrics(gt, swapped, [])["bbox_AP"] == 0.0
    # a box shifted by 8 of its 40 rows: IoU 960 / 1440 = 2/3, a hit at IoU 0.5 and not at 0.75
    shifted = [{**boxes[0], "bbox": [10, 20 + 8, 30, 40]}, boxes[1]]
    partial = coco_metrics(gt, shifted, [])
    assert partial["bbox_AP50"] == pytest.approx(100.0) and partial["bbox_AP75"] == pytest.approx(50.0)
    # AP over IoU 0.50:0.95: the shifted box counts at 0.50, 0.55, 0.60, 0.65 (4 of 10 thresholds)
    assert partial["bbox_AP"] == pytest.approx((100.0 + 40.0) / 2)
    # both instances of one category, one found: precision 1 up to recall 0.5 -> 51 of the 101 recall points
    one_category = {**gt, "annotations": [{**a, "category_id": 3} for a in gt["annotations"]]}
    found = [{**boxes[0], "category_id": 3}]
    assert coco_metrics(one_category, found, [])["bbox_AP"] == pytest.approx(100.0 * 51 / 101)


@pytest.fixture(scope="module")
def det_shards(dense_shapes, tmp_path_factory):
    out = {}
    for split, name in (("training", "train"), ("validation", "val")):
        out[name] = tmp_path_factory.mktemp(f"det_{name}")
        assert cli(["make-shards", str(dense_shapes.images(split)), str(out[name]), "--kind", "detection",
                    "--annotations", str(dense_shapes.coco(split)), "--quiet"]) == 0
    return out


def test_the_loaders_targets_mapped_back_to_the_original_images_score_100(det_shards):
    """The evaluation loader resizes every image (96-160 px -> short side 128, here up and down); its own
    targets, taken as detections, must come back to the annotation file's boxes and masks."""
    shards = det_shards["val"]
    category_ids = Manifest.load(shards).category_ids
    loader = build_detection_loader(shards, train=False, micro_batch=3, short_side=128, max_long_side=213)
    boxes, masks, seen = [], [], 0
    for batch in loader:
        for target, valid in zip(batch.targets, batch.valid.tolist()):
            if not valid:
                continue
            seen += 1
            assert target["size"].tolist() != target["orig_size"].tolist()  # resized
            n = len(target["labels"])
            output = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.linspace(1, 0.5, n),
                      "masks": target["masks"][:, None].float()}
            b, m = coco_detections(output, target, category_ids)
            boxes += b
            masks += m
    assert seen == 16
    metrics = coco_metrics(coco_ground_truth(shards), boxes, masks)
    assert metrics["bbox_AP"] > 99.0 and metrics["bbox_AP75"] == pytest.approx(100.0)
    assert metrics["segm_AP50"] == pytest.approx(100.0) and metrics["segm_AP"] > 90.0  # nearest down, bilinear up


# ------------------------------------------------------------------------------------------- the chain

def detect_args(run_dir, shards, *overrides, config="tiny_detect_cpu"):
    return ["detect", "--config", config, "--run-dir", str(run_dir), f"data.shards={shards['train']}",
            f"data.val_shards={shards['val']}", "tracking.enabled=false", f"schedule.epochs={DETECT_EPOCHS}",
            "detect.eval_every_epochs=3", *overrides]


def final_eval(stdout: str) -> dict[str, float]:
    found = EVAL.findall(stdout)
    assert found, stdout[-3000:]
    return eval(found[-1][1])  # the logged dict of floats


def assert_evaluate_prints_the_best_runs_box_ap(run_dir, det_shards, config: str) -> None:
    """``itpn-ds evaluate`` of ``RUN_DIR/best`` prints the box AP the run logged for it (to 4 places)."""
    best = json.loads((run_dir / "best" / "config.json").read_text())["metrics"]["bbox_AP"]
    proc = run_in_process("evaluate", "--config", config, "--checkpoint", str(run_dir / "best"),
                          f"data.val_shards={det_shards['val']}", "tracking.enabled=false")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert float(re.search(r"bbox_AP ([\d.]+)", proc.stdout).group(1)) == pytest.approx(best, abs=1e-3)


def exported_features(run_dir, out) -> tuple[dict, dict[str, torch.Tensor], torch.nn.Module]:
    """``itpn-ds export`` of a detection run: (its config.json, its tensors, the timm ``features_only`` model read
    back from them)."""
    from safetensors.torch import load_file

    itpn_ds_in_process("export", "--checkpoint", str(run_dir), "--out", str(out))
    meta = json.loads((out / "config.json").read_text())
    features = create_model(meta["architecture"], features_only=True, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
                            **meta["model_kwargs"]).eval()
    return meta, load_file(str(out / "model.safetensors")), features


@pytest.mark.dist
def test_mask_rcnn_fine_tunes_from_a_pretraining_run_on_2_ranks_and_exports(det_shards, tiny_pretrain_run, tmp_path):
    """The tiny pre-training starts Mask R-CNN on 2 ranks with every pyramid key used; the run learns the shapes,
    evaluates after epochs 3 and 6, ``itpn-ds evaluate`` of its best reproduces its AP and the export reads back
    through timm ``features_only`` with the fine-tuned backbone."""
    run_dir = tmp_path / "run"
    out = itpn_ds_cli(*detect_args(run_dir, det_shards, f"detect.init={tiny_pretrain_run}"), ranks=2)
    report = re.search(r"initialised DenseITPN from \S+: (.*)", out).group(1)
    assert "dropped" in report and not re.search(r"fresh \d+: [^;]*(fpn_modules|block_16to8|align_dim)", report), report
    evaluations = [int(epoch) for epoch, _ in EVAL.findall(out)]
    metrics = final_eval(out)
    print(f"after {DETECT_EPOCHS} epochs: box AP {metrics['bbox_AP']:.1f} (AP75 {metrics['bbox_AP75']:.1f}), "
          f"mask AP {metrics['segm_AP']:.1f}")
    assert evaluations == [3, DETECT_EPOCHS] and metrics["images"] == 16.0
    assert all(0.0 <= metrics[f"{t}_{m}"] <= 100.0 for t in ("bbox", "segm") for m in ("AP", "AP50", "AP75"))
    assert metrics["bbox_AP"] > 3 and metrics["segm_AP"] > 3  # it learns to find the shapes
    assert_evaluate_prints_the_best_runs_box_ap(run_dir, det_shards, "tiny_detect_cpu")

    meta, weights, features = exported_features(run_dir, tmp_path / "export")
    assert meta["architecture"] == "mask_rcnn_itpn_base_3324" and meta["task"] == "detect"
    backbone = {k[len("backbone.body."):]: v for k, v in weights.items() if k.startswith("backbone.body.")}
    assert torch.equal(features.model.state_dict()["fpn_modules.0.mlp.fc1.weight"], backbone["fpn_modules.0.mlp.fc1.weight"])
    with torch.no_grad():
        levels = features(torch.rand(1, 3, 128, 192))
    assert [tuple(level.shape[-2:]) for level in levels] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]


@pytest.mark.chain  # 6 epochs of Cascade Mask R-CNN in this process: about a minute
def test_cascade_mask_rcnn_fine_tunes_from_a_pretraining_run_and_exports_every_stage(det_shards, tiny_pretrain_run,
                                                                                     tmp_path):
    """Cascade Mask R-CNN (tiny_cascade_cpu: the published cascade heads) from the same pre-training, one rank in the
    test process at the 2-rank run's global batch (2 accumulated micro-batches of 2; the Mask R-CNN chain above
    holds the 2-rank detection run): its third stage trains, it learns the shapes, ``itpn-ds evaluate``
    reproduces the run's AP, and the export holds every stage and reads back through ``features_only``."""
    run_dir = tmp_path / "run"
    out = itpn_ds_in_process(*detect_args(run_dir, det_shards, f"detect.init={tiny_pretrain_run}",
                                          "schedule.global_batch=4", config="tiny_cascade_cpu"))
    assert re.search(r"initialised DenseITPN from \S+: .*dropped", out)
    assert "loss_box_reg_s2" in out  # the third stage trains
    metrics = final_eval(out)
    print(f"cascade after {DETECT_EPOCHS} epochs: box AP {metrics['bbox_AP']:.1f} (AP75 {metrics['bbox_AP75']:.1f}), "
          f"mask AP {metrics['segm_AP']:.1f}")
    assert metrics["images"] == 16.0 and metrics["bbox_AP"] > 3
    assert_evaluate_prints_the_best_runs_box_ap(run_dir, det_shards, "tiny_cascade_cpu")

    meta, weights, features = exported_features(run_dir, tmp_path / "export")
    assert meta["architecture"] == "cascade_mask_rcnn_itpn_base_3324" and meta["model_kwargs"]["roi_head"] == "cascade"
    assert any(k.startswith("roi_heads.later_stages.1.") for k in weights)  # the whole cascade is exported
    assert torch.equal(features.model.state_dict()["fpn_modules.0.mlp.fc1.weight"],
                       weights["backbone.body.fpn_modules.0.mlp.fc1.weight"])


def test_a_pixel_pretraining_fine_tunes_into_both_detectors_and_upernet(det_shards, dense_shapes, demo_shards, tmp_path):
    """A tiny pixel (MAE-style) pre-training run starts Mask R-CNN, Cascade Mask R-CNN and UperNet by their pixel task
    names (the rows of the dense table from pixel pre-training): the backbone and pyramid load, the decoder is
    dropped, each trains 2 steps; the detectors' backbones under the published bf16 autocast."""
    pixel = tmp_path / "pixel"
    itpn_ds_in_process("pretrain", "--config", "tiny_pretrain_pixel_cpu", "--run-dir", str(pixel),
                       f"data.shards={demo_shards}", "schedule.max_steps=2", "tracking.enabled=false")
    tiny = ["model.kwargs.init_values=0", "schedule.max_steps=2", "schedule.epochs=1", "telemetry.log_every=1",
            "tracking.enabled=false"]
    for name, config in (("mask_rcnn_itpn_pixel_base_3324", "tiny_detect_cpu"),
                         ("cascade_mask_rcnn_itpn_pixel_base_3324", "tiny_cascade_cpu")):
        out = itpn_ds_in_process(*detect_args(tmp_path / name, det_shards, f"detect.init={pixel}", f"model.name={name}",
                                              "model.kwargs.backbone_autocast=bf16", *tiny, config=config))
        report = re.search(r"initialised DenseITPN from \S+: (.*)", out).group(1)
        assert "decoder" in report and "fresh" not in report, report  # every backbone and pyramid key loads
        assert re.search(r"step 2 .*loss_box_reg" + ("_s2" if name.startswith("cascade") else ""), out)
    seg = tmp_path / "seg_shards"
    assert cli(["make-shards", str(dense_shapes.images("validation")), str(seg), "--kind", "segmentation",
                "--annotations", str(dense_shapes.annotations("validation")), "--class-names",
                str(dense_shapes.class_names), "--reduce-zero-label", "--quiet"]) == 0
    out = itpn_ds_in_process("segment", "--config", "tiny_segment_cpu", "--run-dir", str(tmp_path / "upernet"),
                             f"data.shards={seg}", f"data.val_shards={seg}", f"segment.init={pixel}",
                             "model.name=upernet_itpn_pixel_base_3324_patch16_512", "segment.eval_every_epochs=1", *tiny)
    report = re.search(r"initialised DenseITPN from \S+: (.*)", out).group(1)
    assert "decoder" in report and not re.search(r"fresh \d+: [^;]*(fpn_modules|align_dim)", report), report
    assert re.search(r"step 2 .*loss", out)
