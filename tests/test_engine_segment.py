"""The segment task's parts in process: the poly schedule, sliding windows, the mIoU counts, the loss over
labelled pixels, SyncBatchNorm on the CPU. The end-to-end runs (2 ranks, pre-trained vs random init, resume,
export, evaluate) are in test_engine_segment_e2e.py."""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from torch import nn

from itpn_ds.models import create_model
import itpn_ds.models  # noqa: F401 - registers the names
from itpn_ds.config import load_config
from itpn_ds.data.batch import Batch
from itpn_ds.engine.schedule import PolySchedule, build_schedule
from itpn_ds.engine.batch_norm import sync_batch_norm
from itpn_ds.engine.tasks.segment import SegmentTask, area_counts, slide_logits, summarize, whole_logits, window_boxes
from tests.fixtures.cli import free_port

TINY = dict(img_size=64, embed_dim=64, mlp_depth1=1, mlp_depth2=1, depth=4, num_heads=2, fpn_dim=32, init_values=0.1,
            channels=32, aux_channels=16, num_classes=3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("upernet_itpn_base_3324_patch16_512", **TINY).eval()


def test_poly_schedule_is_mmseg_poly_times_the_warmup_ramp():
    cfg = load_config("tiny_segment_cpu", ["optim.lr=1e-2", "optim.min_lr=1e-4", "optim.warmup_steps=10",
                                           "optim.poly_power=0.9"]).optim
    schedule = build_schedule(cfg, steps_per_epoch=7, total_steps=100)
    assert isinstance(schedule, PolySchedule)
    poly = lambda step: (1e-2 - 1e-4) * (1 - step / 100) ** 0.9 + 1e-4  # noqa: E731
    assert schedule.lr_at(0) == pytest.approx(poly(0) / 10)
    assert schedule.lr_at(4) == pytest.approx(poly(4) * 5 / 10)
    for step in (10, 37, 99):
        assert schedule.lr_at(step) == pytest.approx(poly(step))
    assert schedule.lr_at(100) == pytest.approx(1e-4)
    assert schedule.weight_decay_at(0) == schedule.weight_decay_at(99) == cfg.weight_decay  # constant as published
    assert type(build_schedule(load_config("tiny_finetune_cpu").optim, 7, 100)).__name__ == "CosineSchedule"


@pytest.mark.parametrize("height, width", [(64, 64), (100, 130), (40, 200), (129, 64)])
def test_windows_cover_every_pixel_and_end_at_the_border_as_mmseg(height, width):
    crop, stride = (64, 64), (43, 43)
    boxes = window_boxes(height, width, crop, stride)
    rows = max(height - 64 + 42, 0) // 43 + 1
    cols = max(width - 64 + 42, 0) // 43 + 1
    assert len(boxes) == rows * cols
    cover = torch.zeros(height, width)
    for y1, x1, y2, x2 in boxes:
        assert (y2 - y1, x2 - x1) == (min(64, height), min(64, width))
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1
    assert max(b[2] for b in boxes) == height and max(b[3] for b in boxes) == width


def test_slide_inference_of_one_window_is_whole_inference_and_odd_sizes_are_padded(model):
    torch.manual_seed(1)
    image = torch.randn(1, 3, 64, 96)
    whole = whole_logits(model, image, 32)
    assert torch.allclose(slide_logits(model, image, (64, 96), (43, 43), 32), whole, atol=1e-6)
    odd = torch.randn(1, 3, 70, 101)  # neither side a multiple of 32: padded, then cut back
    scores = slide_logits(model, odd, (64, 64), (43, 43), 32)
    assert scores.shape == (1, 3, 70, 101) and torch.isfinite(scores).all()
    # a pixel covered by one window only has that window's score
    first = whole_logits(model, odd[..., :64, :64], 32)
    assert torch.allclose(scores[..., :6, :6], first[..., :6, :6], atol=1e-5)


def test_area_counts_and_metrics_match_hand_computed_values():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    counts = area_counts(prediction, label, num_classes=4)
    # class 0: labelled 2, predicted 2 (one right); 1: labelled 3, predicted 3 (two right: one wrong as 2); 2: ...
    intersect, union, pred, lab = counts.tolist()
    assert intersect == [1, 2, 1, 0] and lab == [2, 3, 2, 0] and pred == [2, 3, 2, 0]
    assert union == [3, 4, 3, 0]
    metrics = summarize(counts, ["a", "b", "c", "never"])
    assert metrics["aAcc"] == pytest.approx(100 * 4 / 7)
    assert metrics["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 4 + 1 / 3) / 3)  # absent class not averaged
    assert metrics["mAcc"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert metrics["IoU/b"] == pytest.approx(50.0) and "IoU/never" not in metrics


def test_segment_loss_is_the_mean_over_labelled_pixels_and_padding_counts_nothing(model):
    torch.manual_seed(2)
    model.train()
    images = torch.randn(3, 3, 64, 64)
    labels = torch.randint(0, 3, (3, 64, 64))
    labels[0, :32] = 255
    task = SegmentTask(aux_weight=0.4)
    torch.manual_seed(3)
    result = task.forward(model, Batch(images=images, keys=["a", "b", "c"], label_maps=labels,
                                       valid=torch.tensor([True, True, False])))
    torch.manual_seed(3)
    output = model(images)
    keep = labels[:2]
    def ce(logits):
        up = nn.functional.interpolate(logits[:2], size=(64, 64), mode="bilinear", align_corners=False)
        return nn.functional.cross_entropy(up.float(), keep, ignore_index=255)
    assert result.loss.item() == pytest.approx((ce(output.logits) + 0.4 * ce(output.aux_logits)).item(), rel=1e-5)
    assert result.valid.item() == 2
    model.eval()


def test_sync_batchnorm_has_no_cpu_kernel_so_cpu_ranks_keep_plain_batchnorm(model, monkeypatch):
    """PyTorch's SyncBatchNorm refuses CPU tensors once a process group exists (gloo here), so the engine
    converts only on CUDA; with the CPU and several ranks each rank normalises with its own statistics."""
    cfg = load_config("tiny_segment_cpu")
    bn = nn.SyncBatchNorm(4).train()
    joined = not dist.is_initialized()  # an in-process CLI run of an earlier test may have left its group
    if joined:
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            bn(torch.randn(2, 4, 3, 3))
    finally:
        if joined:
            dist.destroy_process_group()
    kept = sync_batch_norm(model, cfg.segment.sync_bn, world_size=2, device=torch.device("cpu"), option="segment.sync_bn")
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in kept.modules())
    converted = sync_batch_norm(create_model("upernet_itpn_base_3324_patch16_512", **TINY), cfg.segment.sync_bn,
                                world_size=2, device=torch.device("cuda"), option="segment.sync_bn")
    norms = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert set(converted.state_dict()) == set(model.state_dict())  # checkpoints move between the two
