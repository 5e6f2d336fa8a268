"""Dense transfer models: the dense backbones (timm features_only, layouts, rectangular inputs), loading a
pre-training checkpoint, UperNet, Mask R-CNN on torchvision, layer decay and export (docs/dense.md)."""
import pytest
import torch

import itpn_ds.models  # noqa: F401  (registers the timm names)
from itpn_ds.engine.export import write_export
from itpn_ds.engine.optim import param_groups
from itpn_ds.models import create_model, ITPN, FastITPNClipDistill, ITPNClipDistill, ITPNPixelMAE, load_weights
from itpn_ds.models.dense import LAYOUTS, DenseFastITPN, DenseITPN
from itpn_ds.models.detection import LEVEL_NAMES, PyramidBackbone
from itpn_ds.models.layers import Attention, relative_position_index
from itpn_ds.models.loading import PRETRAIN_ONLY_PREFIXES
from itpn_ds.models.pyramid import PYRAMID_PREFIXES
from itpn_ds.models.segmentation import SegmentationModel, segmentation_loss
from tests.test_models import assert_checkpointing_keeps_gradients

# 64 px pre-training grid (4 x 4 patches); D = 64, F = 32. Inputs are rectangular and not the training size.
HIVIT = dict(img_size=64, embed_dim=64, mlp_depth1=1, mlp_depth2=1, depth=3, num_heads=2, fpn_dim=32)
FAST = dict(img_size=64, embed_dim=64, depth_stage1=1, depth_stage2=1, depth=3, num_heads=2, fpn_dim=32)
FAMILIES = {"itpn": ("clip_tpn_base_3324_patch16_224", HIVIT), "fast": ("fast_clip_tpn_base_3324_patch16_224", FAST)}
SIZES = {"segmentation": (96, 160), "detection": (128, 192)}  # multiples of the coarsest stride (32, 64)
PRETRAINING_HEADS = ("mask_token", "lm_head", "lm_cls_head", "norm.", "norm_cls", "cls_pt_layers", "decoder_embed")


def dense_backbone(family: str, layout: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    cls, config = (DenseITPN, HIVIT) if family == "itpn" else (DenseFastITPN, FAST)
    return cls(layout=layout, **{**config, "init_values": 0.1, **kwargs})


def randomise_position_tables(model: torch.nn.Module) -> None:
    """Relative-position tables start at zero; random ones make a wrong resize or index visible."""
    for m in model.modules():
        if isinstance(m, Attention) and m.relative_position_bias_table is not None:
            torch.nn.init.normal_(m.relative_position_bias_table)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_features_only_levels_match_feature_info(family, layout):
    name, config = FAMILIES[family]
    model = create_model(name, features_only=True, layout=layout, **config).eval()
    H, W = SIZES[layout]
    with torch.no_grad():
        levels = model(torch.randn(2, 3, H, W))
    info = model.feature_info
    assert len(levels) == len(info.out_indices) == len(LAYOUTS[layout].strides)
    for level, channels, stride in zip(levels, info.channels(), info.reduction()):
        assert level.shape == (2, channels, H // stride, W // stride)
    assert info.reduction() == list(LAYOUTS[layout].strides)
    D, F = config["embed_dim"], config["fpn_dim"]
    expected = [F + D // 4, F + D // 2, F + D, F + D] if layout == "segmentation" else [F] * 5
    assert info.channels() == expected

    some = create_model(name, features_only=True, layout=layout, out_indices=(1, -1), **config).eval()
    some.load_state_dict(model.state_dict())
    with torch.no_grad():
        picked = some(torch.zeros(2, 3, H, W))
        full = model(torch.zeros(2, 3, H, W))
    assert some.feature_info.reduction() == [8, LAYOUTS[layout].strides[-1]]
    torch.testing.assert_close(picked[0], full[1])
    torch.testing.assert_close(picked[1], full[-1])


@pytest.mark.parametrize("name,expected", [("upernet_itpn_base_3324_patch16_512", [384, 512, 768, 768]),
                                           ("upernet_itpn_large_2240_patch16_512", [448, 640, 1024, 1024])])
def test_segmentation_layout_has_the_published_channels(name, expected):
    with torch.device("meta"):
        model = create_model(name)
    assert [i["num_chs"] for i in model.backbone.feature_info] == expected
    assert [i["reduction"] for i in model.backbone.feature_info] == [4, 8, 16, 32]
    assert [conv[0].in_channels for conv in model.decode_head.lateral_convs] == expected[:3]
    assert model.decode_head.psp_modules[0][1][0].in_channels == expected[3]
    assert model.decode_head.conv_seg.in_channels == 768 and model.decode_head.conv_seg.out_channels == 150
    assert model.aux_head.convs[0][0].in_channels == expected[2]  # level 2 (stride 16), as mmseg's in_index=2
    assert len(model.backbone.block_16to8) == 2 and model.backbone.img_size == 512  # fpn_depth 2 at 512 px


def test_detection_layout_is_five_levels_of_256_channels_with_average_pooled_extras():
    with torch.device("meta"):
        model = create_model("mask_rcnn_itpn_base_3324")
    assert model.backbone.out_channels == 256 and model.backbone.strides == (4, 8, 16, 32, 64)
    assert len(model.backbone.body.block_16to8) == 1
    backbone = dense_backbone("itpn", "detection").eval()
    with torch.no_grad():
        levels = backbone(torch.randn(1, 3, 128, 64))
    torch.testing.assert_close(levels[3], torch.nn.functional.avg_pool2d(levels[2], 2))
    torch.testing.assert_close(levels[4], torch.nn.functional.avg_pool2d(levels[3], 2))


def test_bf16_backbone_autocast_hands_the_heads_fp32_levels_close_to_the_fp32_backbones():
    """``backbone_autocast: bf16`` (the published detection recipes): the backbone runs under bf16 autocast, the
    levels reach the heads in fp32 and stay within bf16 rounding of the same weights run in fp32."""
    body = dense_backbone("itpn", "detection").eval()
    images = torch.randn(2, 3, 128, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32 = PyramidBackbone(body)(images)
        bf16 = PyramidBackbone(body, autocast="bf16")(images)
    assert list(bf16) == list(fp32) == list(LEVEL_NAMES)
    for name in LEVEL_NAMES:
        assert bf16[name].dtype == torch.float32 and bf16[name].shape == fp32[name].shape
        assert not torch.equal(bf16[name], fp32[name])  # the autocast region really ran in bf16
        torch.testing.assert_close(bf16[name], fp32[name], rtol=0.1, atol=0.1)


def test_dense_levels_at_the_training_size_are_the_pyramid_maps():
    """At its own square size the dense backbone is the published pyramid (``ITPN.forward_pyramid_maps``, the
    existing path) plus the layout: levels concatenated with the stage features, a max-pooled stride 32."""
    backbone = dense_backbone("itpn", "segmentation", fpn_depth=1).eval()
    randomise_position_tables(backbone)
    pyramid = ITPN(num_outs=3, init_values=0.1, **HIVIT).eval()
    pyramid.load_state_dict(backbone.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        levels, maps = backbone(x), pyramid.forward_pyramid_maps(x)
    F = HIVIT["fpn_dim"]
    for level, pyramid_map in zip(levels[:3], reversed(maps)):
        torch.testing.assert_close(level[:, :F], pyramid_map)
    torch.testing.assert_close(levels[3], torch.nn.functional.max_pool2d(levels[2], 2))


@pytest.mark.parametrize("family", FAMILIES)
def test_run_time_resize_equals_the_load_time_resize_of_another_resolution(family):
    """A 96 px input to a 64 px model (position embedding and RPE tables resampled in forward) gives what a
    96 px model gives with the 64 px weights loaded (``load_weights`` resamples them once)."""
    small = dense_backbone(family, "segmentation").eval()
    randomise_position_tables(small)
    big = dense_backbone(family, "segmentation", img_size=96).eval()
    report = load_weights(big, small.state_dict())
    assert report.resized
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        for a, b in zip(small(x), big(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_relative_position_index_of_a_rectangular_grid_and_its_resampled_table():
    h, w = 2, 3
    index = relative_position_index((h, w))
    coords = [(r, c) for r in range(h) for c in range(w)]
    for q, (qr, qc) in enumerate(coords):  # the published (row + h-1)·(2w-1) + (col + w-1)
        for k, (kr, kc) in enumerate(coords):
            assert index[q, k] == (qr - kr + h - 1) * (2 * w - 1) + (qc - kc + w - 1)
    assert torch.equal(relative_position_index(4), relative_position_index((4, 4)))
    attn = Attention(dim=8, num_heads=2, rpe_grid=4)
    torch.nn.init.normal_(attn.relative_position_bias_table)
    own = attn.relative_position_bias_table
    assert attn.bias_table(own, (4, 4)) is own and attn.bias_table(own) is own
    table = attn.bias_table(own, (h, w))
    assert table.shape == ((2 * h - 1) * (2 * w - 1), 2)
    table.sum().backward()
    assert attn.relative_position_bias_table.grad.abs().sum() > 0


@pytest.mark.parametrize("layout,fresh_blocks", [("segmentation", 1), ("detection", 0)])
@pytest.mark.parametrize("family", FAMILIES)
def test_clip_pretraining_loads_with_every_pyramid_key_used(family, layout, fresh_blocks):
    torch.manual_seed(1)
    if family == "itpn":
        pretrained = ITPNClipDistill(teacher_dim=24, **HIVIT)
    else:
        pretrained = FastITPNClipDistill(teacher_dim=24, **FAST)
    state = pretrained.state_dict()
    backbone = dense_backbone(family, layout)
    report = load_weights(backbone, state)

    pyramid_keys = {k for k in state if k.startswith(PYRAMID_PREFIXES)}
    assert pyramid_keys and pyramid_keys <= set(report.loaded)
    assert not [k for k in report.dropped if k.startswith(PYRAMID_PREFIXES)]
    assert report.dropped and all(k.startswith(PRETRAINING_HEADS) for k in report.dropped)
    assert all(k.startswith(PRETRAIN_ONLY_PREFIXES) for k in report.dropped)
    # the segmentation layout's second pyramid block per level (fpn_depth 2) has no pre-trained counterpart
    fresh_pyramid = {k.split(".")[0] + "." + k.split(".")[1] for k in report.fresh if k.startswith(PYRAMID_PREFIXES)}
    assert fresh_pyramid == ({"block_16to8.1", "block_8to4.1"} if fresh_blocks else set())
    own = backbone.state_dict()
    for k in pyramid_keys | {"patch_embed.proj.weight", "blocks.4.norm1.weight"}:
        torch.testing.assert_close(own[k], state[k], msg=k)


def test_pixel_pretraining_loads_into_the_dense_backbone_of_its_name(tmp_path):
    """The pixel name's dense backbone has its pyramid depth (2, as the segmentation layout) and no RPE."""
    torch.manual_seed(1)
    config = {k: v for k, v in HIVIT.items() if not k.startswith("mlp_depth")}
    pixel = ITPNPixelMAE(mlp_depth=1, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, **config)
    file = tmp_path / "pixel.pth"
    torch.save({"model": pixel.state_dict()}, file)
    features = create_model("itpn_base_dec512d8b", features_only=True, pretrained=True, mlp_depth=1,
                            pretrained_cfg_overlay=dict(file=str(file)), **config)
    report = load_weights(features.model, pixel.state_dict())
    assert not report.fresh and all(k.startswith(("decoder_", "mask_token")) for k in report.dropped)
    assert [lvl.shape[1] for lvl in features(torch.randn(1, 3, 64, 96))] == [48, 64, 96, 96]


def tiny_upernet(family: str = "itpn", **kwargs) -> SegmentationModel:
    name = "upernet_itpn_base_3324_patch16_512" if family == "itpn" else "upernet_fast_itpn_base_3324_patch16_512"
    config = HIVIT if family == "itpn" else FAST
    torch.manual_seed(0)
    return create_model(name, num_classes=5, channels=16, aux_channels=8, **{**config, **kwargs})


@pytest.mark.parametrize("family", FAMILIES)
def test_upernet_logits_at_a_quarter_resolution_and_gradients_reach_the_backbone(family):
    model = tiny_upernet(family).train()
    x = torch.randn(2, 3, 96, 160)
    out = model(x)
    assert out.logits.shape == (2, 5, 24, 40) and out.aux_logits.shape == (2, 5, 6, 10)
    labels = torch.randint(0, 5, (2, 96, 160))
    labels[:, :10] = 255  # ignored
    loss = segmentation_loss(out, labels)
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("backbone.patch_embed.proj.weight", "backbone.blocks.0.mlp.fc1.weight",
                 "backbone.align_dim_8to4.weight", "decode_head.conv_seg.weight", "aux_head.conv_seg.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    model.eval()
    out = model(x)
    assert out.aux_logits is None
    assert model.predict(x).shape == (2, 5, 96, 160)


def test_upernet_checkpointing_keeps_gradients():
    model = tiny_upernet(drop_path_rate=0.0).train()  # the registered 0.2 would differ between the runs
    for m in model.modules():  # so would dropout and batch statistics
        if isinstance(m, (torch.nn.Dropout2d, torch.nn.BatchNorm2d)):
            m.eval()
    assert_checkpointing_keeps_gradients(model, lambda m, x: m(x).logits.sum(), torch.randn(2, 3, 64, 96))
    assert model.backbone.grad_ckpt_every == 2


def test_regional_compilation_finds_the_backbone_blocks_of_a_task_model():
    from itpn_ds.models.compile import repeated_blocks

    model = tiny_upernet()
    assert list(repeated_blocks(model)) == list(repeated_blocks(model.backbone))
    # stage blocks, main blocks, fpn_modules, block_16to8 and block_8to4 (fpn_depth 2)
    assert len(list(repeated_blocks(model))) == 2 + 3 + 3 + 2 + 2


def detection_batch() -> tuple[list[torch.Tensor], list[dict]]:
    torch.manual_seed(0)
    images = [torch.rand(3, 100, 140), torch.rand(3, 120, 90)]
    masks = [torch.zeros(1, 100, 140, dtype=torch.uint8), torch.zeros(2, 120, 90, dtype=torch.uint8)]
    masks[0][0, 10:50, 10:60] = 1
    masks[1][0, 20:90, 5:40] = 1
    masks[1][1, 30:100, 30:80] = 1
    targets = [dict(boxes=torch.tensor([[10.0, 10, 60, 50]]), labels=torch.tensor([1]), masks=masks[0]),
               dict(boxes=torch.tensor([[5.0, 20, 40, 90], [30, 30, 80, 100]]), labels=torch.tensor([2, 3]),
                    masks=masks[1])]
    return images, targets


def test_mask_rcnn_trains_and_detects_on_images_of_two_sizes():
    torch.manual_seed(0)
    few = dict(rpn_post_nms_top_n_train=200, rpn_post_nms_top_n_test=100, box_batch_size_per_image=64,
               box_detections_per_img=10)  # fewer proposals and detections: a fast CPU test
    model = create_model("mask_rcnn_itpn_base_3324", num_classes=4, detector_kwargs=few, **HIVIT)
    assert isinstance(model.backbone, PyramidBackbone)
    assert model.rpn.anchor_generator.num_anchors_per_location() == [3] * 5
    assert model.roi_heads.box_roi_pool.featmap_names == list(LEVEL_NAMES[:4])
    assert model.transform.size_divisible == 64 and model.roi_heads.detections_per_img == 10
    images, targets = detection_batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for name in ("backbone.body.patch_embed.proj.weight", "backbone.body.blocks.0.mlp.fc1.weight",
                 "backbone.body.fpn_modules.0.mlp.fc1.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for det, image in zip(detections, images):
        n = det["boxes"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["labels"].shape == det["scores"].shape == (n,)
        assert det["masks"].shape == (n, 1, *image.shape[-2:])


def test_mask_rcnn_trains_on_a_batch_with_an_image_left_without_instances():
    """The loader's crop branch may cut every instance away (mmdet's ``allow_negative_crop``): such an image
    is a background-only sample, and its empty target still trains (a finite loss that reaches the backbone)."""
    torch.manual_seed(0)
    few = dict(rpn_post_nms_top_n_train=100, box_batch_size_per_image=32)
    model = create_model("mask_rcnn_itpn_base_3324", num_classes=4, detector_kwargs=few, **HIVIT).train()
    images, targets = detection_batch()
    images.append(torch.rand(3, 64, 128))
    targets.append(dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64),
                        masks=torch.zeros(0, 64, 128, dtype=torch.uint8)))
    total = sum(model(images, targets).values())
    assert torch.isfinite(total)
    total.backward()
    assert model.get_parameter("backbone.body.blocks.0.mlp.fc1.weight").grad.abs().sum() > 0


def test_mask_rcnn_detections_do_not_depend_on_the_first_image_it_saw():
    """The RoIAligns' level scales come from the backbone's strides, not from the first batch: torchvision
    would infer them from a 70 px high image padded to 128 one octave off and keep them (the standalone
    ``itpn-ds evaluate`` of a detector scored near 0 AP against its training run's evaluation so)."""
    few = dict(rpn_post_nms_top_n_test=50, box_detections_per_img=10, box_score_thresh=0.0)
    torch.manual_seed(0)
    reference = create_model("mask_rcnn_itpn_base_3324", num_classes=4, detector_kwargs=few, **HIVIT).eval()
    primed = create_model("mask_rcnn_itpn_base_3324", num_classes=4, detector_kwargs=few, **HIVIT).eval()
    primed.load_state_dict(reference.state_dict())
    image = detection_batch()[0][0]  # 100 x 140, padded to 128 x 192
    with torch.no_grad():
        primed([torch.rand(3, 70, 140)])  # padded to 128 x 192: rounds 32 / 70 to a scale of 1/2 at stride 4
        expected, got = reference([image])[0], primed([image])[0]
    assert expected["boxes"].shape[0] > 0
    for key in ("boxes", "scores", "labels", "masks"):
        torch.testing.assert_close(got[key], expected[key])
    for pool in (primed.roi_heads.box_roi_pool, primed.roi_heads.mask_roi_pool):
        assert pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
        assert (pool.map_levels.k_min, pool.map_levels.k_max) == (2, 5)


def test_mask_rcnn_transform_pads_to_the_coarsest_stride_and_resizes_only_when_asked():
    images, targets = detection_batch()
    pad_only = create_model("mask_rcnn_itpn_base_3324", num_classes=4, **HIVIT).eval()
    batch, _ = pad_only.transform(images, targets)
    assert batch.image_sizes == [(100, 140), (120, 90)] and batch.tensors.shape == (2, 3, 128, 192)
    resizing = create_model("mask_rcnn_itpn_base_3324", num_classes=4, resize=True, min_size=200,
                            max_size=400, **HIVIT).eval()
    batch, _ = resizing.transform(images, targets)
    assert batch.image_sizes == [(200, 280), (266, 200)] and batch.tensors.shape == (2, 3, 320, 320)


def test_bad_inputs_name_the_size_and_the_stride():
    seg = dense_backbone("itpn", "segmentation").eval()
    with pytest.raises(ValueError, match=r"image size 64x80 is not a multiple of the segmentation layout's "
                                         r"coarsest stride 32"):
        seg(torch.randn(1, 3, 64, 80))
    det = dense_backbone("fast", "detection").eval()
    with pytest.raises(ValueError, match=r"image size 64x96 is not a multiple of the detection layout's "
                                         r"coarsest stride 64"):
        det(torch.randn(1, 3, 64, 96))
    with pytest.raises(ValueError, match="layout='detection'"):
        PyramidBackbone(seg)
    with pytest.raises(ValueError, match="unknown dense layout 'panoptic'"):
        DenseITPN(layout="panoptic", **HIVIT)


def test_layer_decay_keeps_the_backbone_layers_and_puts_every_head_last():
    seg = tiny_upernet()
    det = create_model("mask_rcnn_itpn_base_3324", num_classes=4, **HIVIT)
    for model, prefix in ((seg, "backbone."), (det, "backbone.body.")):
        backbone = model.dense_backbone
        top = backbone.num_lr_layers - 1
        assert model.num_lr_layers == backbone.num_lr_layers
        for name, _ in model.named_parameters():
            expected = backbone.lr_layer_id(name[len(prefix):]) if name.startswith(prefix) else top
            assert model.lr_layer_id(name) == expected, name
        assert model.lr_layer_id(prefix + "patch_embed.proj.weight") == 0
        assert model.lr_layer_id(prefix + "fpn_modules.0.mlp.fc1.weight") == top
        assert prefix + "absolute_pos_embed" in model.no_weight_decay()
        groups = param_groups(model, layer_decay=0.9)
        scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
        head = "decode_head.conv_seg.weight" if model is seg else "roi_heads.box_predictor.cls_score.weight"
        assert scale[id(model.get_parameter(head))] == 1.0
        assert scale[id(model.get_parameter(prefix + "patch_embed.proj.weight"))] == pytest.approx(0.9 ** top)
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_export_of_a_dense_model_loads_back_as_features_only(task, tmp_path):
    if task == "segmentation":
        name, kwargs = "upernet_itpn_base_3324_patch16_512", dict(num_classes=5, channels=16, aux_channels=8, **HIVIT)
    else:
        name, kwargs = "mask_rcnn_itpn_base_3324", dict(num_classes=4, **HIVIT)
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    randomise_position_tables(model)
    out = write_export(model.state_dict(), {"architecture": name, "model_kwargs": kwargs}, tmp_path / "export")
    file = str(out / "model.safetensors")
    features = create_model(name, features_only=True, pretrained=True,
                            pretrained_cfg_overlay=dict(file=file), **kwargs).eval()
    x = torch.randn(1, 3, 128, 64)
    with torch.no_grad():
        for got, expected in zip(features(x), model.dense_backbone(x)):
            torch.testing.assert_close(got, expected)
    # the backbone's own name with the task's layout takes the same file
    layout = "segmentation" if task == "segmentation" else "detection"
    again = create_model("clip_tpn_base_3324_patch16_224", features_only=True, pretrained=True, layout=layout,
                         pretrained_cfg_overlay=dict(file=file), **HIVIT).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], model.dense_backbone(x)[0])
    report = load_weights(dense_backbone("itpn", layout), model.state_dict())
    assert not report.fresh and report.dropped
    assert not [k for k in report.dropped if k.startswith(model.backbone_prefix)]


def test_task_model_takes_a_pretraining_checkpoint_into_its_backbone(tmp_path):
    torch.manual_seed(1)
    pretrained = ITPNClipDistill(teacher_dim=24, **HIVIT)
    file = tmp_path / "pretrain.pth"
    torch.save({"model": pretrained.state_dict()}, file)
    model = create_model("upernet_itpn_base_3324_patch16_512", pretrained=True, num_classes=5, channels=16,
                         aux_channels=8, pretrained_cfg_overlay=dict(file=str(file)), **HIVIT)
    for k in ("patch_embed.proj.weight", "blocks.4.attn.qkv.weight", "fpn_modules.2.mlp.fc2.weight"):
        torch.testing.assert_close(model.backbone.state_dict()[k], pretrained.state_dict()[k], msg=k)
