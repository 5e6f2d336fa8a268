"""Every shipped recipe: resolves as the CLI resolves it, builds its model at its resolution with the
published parameter count, feeds the loader the model's image size, follows the evaluation crop rule and
states a global batch that its numbers multiply to. docs/recipes.md lists each one.

The expected counts are arithmetic on the published 224 px counts (REFERENCE.md), never the code under test:
a change of input size changes only the absolute position embedding, (grid² − 14²) × D, and, for iTPN
(HiViT) models, each attention block's relative-position bias table, ((2·grid − 1)² − 27²) × heads.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from itpn_ds.models import create_model
from itpn_ds.config import RECIPES_DIR, load_config
from itpn_ds.engine.loader_options import eval_crop_pct
from itpn_ds.engine.model import build_model
from itpn_ds.engine.optim import param_groups
from itpn_ds.engine.schedule import batch_plan

DOCS = Path(__file__).parents[1] / "docs" / "recipes.md"
PATCH = 16
GRID_224 = 224 // PATCH


def position_embedding_delta(dim: int, img_size: int) -> int:
    """Extra parameters of a (1, grid², dim) position embedding at ``img_size`` over the 224 px one."""
    return dim * ((img_size // PATCH) ** 2 - GRID_224 ** 2)


def relative_bias_delta(blocks: int, heads: int, img_size: int) -> int:
    """Extra parameters of ``blocks`` relative-position bias tables ((2g − 1)² × heads each) over 224 px."""
    grid = img_size // PATCH
    return blocks * heads * ((2 * grid - 1) ** 2 - (2 * GRID_224 - 1) ** 2)


def layer_scale_params(dim: int, mlp_depth1: int, mlp_depth2: int, depth: int) -> int:
    """Layer-scale vectors of an iTPN classifier: one (MLP branch) per stage-1/2 block at D/4 and D/2, two
    (attention + MLP) per main block at D (the published BlockWithRPE with init_values > 0)."""
    return mlp_depth1 * dim // 4 + mlp_depth2 * dim // 2 + 2 * depth * dim


def head_delta(dim: int, classes: int) -> int:
    """Extra parameters of a Linear(dim, classes) head over the 1000-class one."""
    return (dim + 1) * (classes - 1000)


# Published counts at 224 px, 1000 classes (REFERENCE.md, "params (official code)").
ITPN_B, ITPN_L = 78_557_992, 288_493_576                       # classifiers, no layer scale
CLIP_TPN_B, CLIP_TPN_L = 89_000_944, 307_452_904               # CLIP-L pre-training, layer scale 0.1
FAST_T, FAST_S, FAST_B, FAST_L = 24_219_976, 39_902_920, 84_825_192, 312_017_320
# Not in REFERENCE.md: counted from the published itpn_pixel/models/models_itpn_mim.py (itpn_base_dec512d8b(),
# itpn_large_dec512d8b(); fpn_depth 2; every parameter, the frozen decoder position embedding included).
PIXEL_B, PIXEL_L = 108_493_344, 318_339_808
# Fast-iTPN CLIP pre-training is ours (no published count): the classifier's backbone (the published count less
# its 1000-class head and final norm) plus the pre-training parts, whose sizes tests/test_fast_clip_distill.py
# states: pyramid, decoder embeddings, mask token, two 768-d heads and two auxiliary blocks.
FAST_PRETRAIN_PARTS = {384: 8_034_424, 512: 11_451_040, 768: 20_840_176}



def conv_bn(cin: int, cout: int, kernel: int) -> int:
    """mmcv's ConvModule without bias + BatchNorm: the conv weight and the norm's weight and bias."""
    return cin * cout * kernel * kernel + 2 * cout


def upernet_heads(in_channels: tuple[int, ...], classes: int = 150, channels: int = 768, aux_channels: int = 256,
                  aux_in: int = 2, pool_scales: int = 4) -> int:
    """mmseg's UPerHead + FCNHead (one conv) as the published ADE20K configs build them, counted by hand:
    pyramid pooling (1x1 per scale, 3x3 bottleneck), 1x1 laterals and 3x3 FPN convs on the three finer levels,
    the 3x3 fusion of all four, the 1x1 classifiers (with bias)."""
    *finer, coarsest = in_channels
    decode = (pool_scales * conv_bn(coarsest, channels, 1) + conv_bn(coarsest + pool_scales * channels, channels, 3)
              + sum(conv_bn(c, channels, 1) + conv_bn(channels, channels, 3) for c in finer)
              + conv_bn(len(in_channels) * channels, channels, 3) + channels * classes + classes)
    aux = conv_bn(in_channels[aux_in], aux_channels, 3) + aux_channels * classes + classes
    return decode + aux


def dense_backbone(name: str, layout: str = "segmentation", img_size: int = 512, **kwargs) -> int:
    """Parameters of a pre-training name's dense backbone (segmentation at 512 px by default), as ``features_only``
    builds it (its layout and channels are tested against the published configs in tests/test_dense_models.py)."""
    import timm

    import itpn_ds.models  # noqa: F401

    with torch.device("meta"):
        model = create_model(name, features_only=True, layout=layout, img_size=img_size, **kwargs)
    return sum(p.numel() for p in model.parameters())


def fast_clip(classifier: int, dim: int) -> int:
    """A Fast-iTPN CLIP pre-training model from its classifier's published count."""
    return classifier - (dim + 1) * 1000 - 2 * dim + FAST_PRETRAIN_PARTS[dim]


def mask_rcnn_heads(width: int = 256, classes: int = 81, fc: int = 1024, anchors: int = 3) -> int:
    """torchvision's Mask R-CNN heads as ``mask_rcnn`` configures them (the published mask_rcnn_r50_fpn heads):
    RPN (3x3 conv + objectness + deltas), box head (4 convs without bias + BatchNorm, 1 fc), box predictor,
    mask head (4 convs with bias), mask predictor (2x2 transposed conv + 1x1 classifier)."""
    conv3 = 9 * width * width
    rpn = conv3 + width + (width + 1) * anchors + (width + 1) * 4 * anchors
    box_head = 4 * (conv3 + 2 * width) + 49 * width * fc + fc
    box_predictor = (fc + 1) * classes + (fc + 1) * 4 * classes
    mask_head = 4 * (conv3 + width)
    mask_predictor = 4 * width * width + width + (width + 1) * classes
    return rpn + box_head + box_predictor + mask_head + mask_predictor


def cascade_heads(width: int = 256, classes: int = 81, fc: int = 1024, anchors: int = 3, stages: int = 3) -> int:
    """Cascade Mask R-CNN as the published cascade config builds it: the RPN and, per stage, a box head,
    class-specific box predictor, mask head and mask predictor (mmdet copies the one mask head to every stage)."""
    conv3 = 9 * width * width
    rpn = conv3 + width + (width + 1) * anchors + (width + 1) * 4 * anchors
    return rpn + stages * (mask_rcnn_heads(width, classes, fc, anchors) - rpn)


def pixel_detection_backbone(name: str) -> int:
    """The detection backbone of a pixel pre-training name at 224 px (no relative positions, as published)."""
    return dense_backbone(name, layout="detection", img_size=224)


def pretraining_only_params(name: str) -> int:
    """Parameters of the CLIP pre-training model ``name`` (whose total is the published count, checked above)
    that a dense backbone does not have: mask token, CLIP heads, their norms, auxiliary blocks and decoder embeddings."""
    import itpn_ds.models  # noqa: F401 - registers the names

    heads = ("mask_token", "lm_head", "lm_cls_head", "norm.", "norm_cls", "cls_pt_layers", "decoder_embed")
    with torch.device("meta"):
        model = create_model(name)
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(heads))


LS_B = layer_scale_params(512, 3, 3, 24)   # 25,728
LS_L = layer_scale_params(768, 2, 2, 40)   # 62,592
CLIP_B_HEADS = {512: 2 * (512 + 1) * (512 - 768), 768: 2 * (768 + 1) * (512 - 768)}  # two heads to 512-d targets

# recipe -> (the itpn-ds command that runs it, expected parameter count). A new recipe needs one line here.
EXPECTED: dict[str, tuple[str, int]] = {
    "fast_itpn_tiny_finetune_224": ("finetune", FAST_T),
    "fast_itpn_tiny_finetune_384": ("finetune", FAST_T + position_embedding_delta(384, 384)),
    "fast_itpn_tiny_finetune_512": ("finetune", FAST_T + position_embedding_delta(384, 512)),
    "fast_itpn_small_finetune_224": ("finetune", FAST_S),
    "fast_itpn_small_finetune_384": ("finetune", FAST_S + position_embedding_delta(384, 384)),
    "fast_itpn_small_finetune_512": ("finetune", FAST_S + position_embedding_delta(384, 512)),
    "fast_itpn_base_finetune_224": ("finetune", FAST_B),
    "fast_itpn_base_finetune_512": ("finetune", FAST_B + position_embedding_delta(512, 512)),
    "fast_itpn_large_finetune_640": ("finetune", FAST_L + position_embedding_delta(768, 640)),
    "fast_itpn_tiny_clip_l_pretrain": ("pretrain", fast_clip(FAST_T, 384)),
    "fast_itpn_small_clip_l_pretrain": ("pretrain", fast_clip(FAST_S, 384)),
    "fast_itpn_base_clip_l_pretrain": ("pretrain", fast_clip(FAST_B, 512)),
    "fast_itpn_large_clip_l_pretrain": ("pretrain", fast_clip(FAST_L + position_embedding_delta(768, 256), 768)),
    "itpn_base_clip_l_pretrain": ("pretrain", CLIP_TPN_B),
    "itpn_large_clip_l_pretrain": ("pretrain", CLIP_TPN_L),
    "itpn_base_clip_b_pretrain": ("pretrain", CLIP_TPN_B + CLIP_B_HEADS[512]),
    "itpn_large_clip_b_pretrain": ("pretrain", CLIP_TPN_L + CLIP_B_HEADS[768]),
    # 40 main blocks + the 2 auxiliary blocks carry relative-position tables.
    "itpn_large_clip_l_pretrain_256": ("pretrain", CLIP_TPN_L + position_embedding_delta(768, 256)
                                       + relative_bias_delta(42, 12, 256)),
    "itpn_base_finetune": ("finetune", ITPN_B + LS_B),
    "itpn_large_finetune": ("finetune", ITPN_L + LS_L),
    "itpn_large_finetune_256": ("finetune", ITPN_L + LS_L + position_embedding_delta(768, 256)
                                + relative_bias_delta(40, 12, 256)),
    "itpn_large_in21k_finetune": ("finetune", ITPN_L + LS_L + head_delta(768, 21841)),
    "itpn_large_in21k_to_in1k_finetune_384": ("finetune", ITPN_L + LS_L + position_embedding_delta(768, 384)
                                              + relative_bias_delta(40, 12, 384)),
    "itpn_base_pixel_pretrain": ("pretrain", PIXEL_B),
    "itpn_large_pixel_pretrain": ("pretrain", PIXEL_L),
    "itpn_base_pixel_finetune": ("finetune", ITPN_B),
    "itpn_large_pixel_finetune": ("finetune", ITPN_L),
    # Mask R-CNN: the pre-training backbone + pyramid (every key loads) and torchvision's heads, 80 classes + bg.
    "mask_rcnn_itpn_base_coco_3x": ("detect", lambda: CLIP_TPN_B - pretraining_only_params(
        "clip_tpn_base_3324_patch16_224") + mask_rcnn_heads()),
    "mask_rcnn_itpn_large_coco_1x": ("detect", lambda: CLIP_TPN_L - pretraining_only_params(
        "clip_tpn_large_2240_patch16_224") + mask_rcnn_heads()),
    "mask_rcnn_itpn_base_coco_1x": ("detect", lambda: CLIP_TPN_B - pretraining_only_params(
        "clip_tpn_base_3324_patch16_224") + mask_rcnn_heads()),
    "cascade_mask_rcnn_itpn_base_coco_3x": ("detect", lambda: CLIP_TPN_B - pretraining_only_params(
        "clip_tpn_base_3324_patch16_224") + cascade_heads()),
    # pixel pre-training: no published count of the detection backbone (its pre-training has the decoder and a
    # second pyramid block); the backbone as features_only builds it + the heads counted by hand.
    "mask_rcnn_itpn_pixel_base_coco_1x": ("detect", lambda: pixel_detection_backbone("itpn_base_dec512d8b")
                                          + mask_rcnn_heads()),
    "mask_rcnn_itpn_pixel_base_coco_3x": ("detect", lambda: pixel_detection_backbone("itpn_base_dec512d8b")
                                          + mask_rcnn_heads()),
    "cascade_mask_rcnn_itpn_pixel_base_coco_3x": ("detect", lambda: pixel_detection_backbone("itpn_base_dec512d8b")
                                                  + cascade_heads()),
    "mask_rcnn_itpn_pixel_large_coco_1x": ("detect", lambda: pixel_detection_backbone("itpn_large_dec512d8b")
                                           + mask_rcnn_heads()),
    "upernet_itpn_pixel_base_ade20k_512": ("segment", lambda: dense_backbone("itpn_base_dec512d8b", rpe=True)
                                           + upernet_heads((384, 512, 768, 768))),
    "upernet_itpn_pixel_large_ade20k_512": ("segment", lambda: dense_backbone("itpn_large_dec512d8b", rpe=True)
                                            + upernet_heads((448, 640, 1024, 1024))),
    # UperNet: no published count; the backbone as features_only builds it + the heads counted by hand.
    "upernet_itpn_base_ade20k_512": ("segment", dense_backbone("clip_tpn_base_3324_patch16_224")
                                     + upernet_heads((384, 512, 768, 768))),
    "upernet_itpn_large_ade20k_512": ("segment", dense_backbone("clip_tpn_large_2240_patch16_224")
                                      + upernet_heads((448, 640, 1024, 1024))),
    "upernet_fast_itpn_base_ade20k_512": ("segment", dense_backbone("fast_clip_tpn_base_3324_patch16_224")
                                          + upernet_heads((384, 512, 768, 768))),
}
# Test-only recipes (CPU tests and the demo): tiny models without a published count; they must still build.
# Every other recipe is a published one and gets every check below.
TEST_ONLY: dict[str, str] = {"tiny_finetune_cpu": "finetune", "tiny_pretrain_cpu": "pretrain",
                             "tiny_pretrain_pixel_cpu": "pretrain", "tiny_fast_pretrain_cpu": "pretrain",
                             "tiny_fast_finetune_cpu": "finetune", "tiny_detect_cpu": "detect", "tiny_cascade_cpu": "detect",
                             "tiny_segment_cpu": "segment"}

# iTPN (HiViT) fine-tuning recipes whose published script decays the lr as itpn_clip/utils/lr_decay.py does:
# recipe -> (the published --layer_decay, the script's layer count = stage-1/2/main blocks + 1).
PUBLISHED_LAYER_DECAY: dict[str, tuple[float, int]] = {
    "itpn_base_finetune": (0.60, 31), "itpn_large_finetune": (0.55, 45), "itpn_large_finetune_256": (0.55, 45),
    "itpn_base_pixel_finetune": (0.60, 31), "itpn_large_pixel_finetune": (0.55, 45),
    "itpn_large_in21k_finetune": (0.75, 45), "itpn_large_in21k_to_in1k_finetune_384": (0.80, 45),
}

# Detection recipes against det/configs/itpn/*.py: recipe -> (lr, layer decay, drop path, lr steps (epochs), epochs).
# The rows without a published config (CLIP-B 1x, pixel L 1x) and the pixel 3x (whose file keeps the 1x schedule)
# take the values docs/dense.md gives for them.
PUBLISHED_DETECTION: dict[str, tuple[float, float, float, list[float], int]] = {
    "mask_rcnn_itpn_base_coco_3x": (1.5e-4, 0.90, 0.3, [27, 33], 36),   # clip_itpn_base_3x_ld090_dp030.py
    "mask_rcnn_itpn_large_coco_1x": (2e-4, 0.95, 0.2, [9, 11], 12),     # clip_itpn_large_1x_ld095_dp020.py
    "mask_rcnn_itpn_pixel_base_coco_1x": (2e-4, 0.90, 0.05, [9, 11], 12),  # pixel_itpn_base_1x_ld090_dp005.py
    "mask_rcnn_itpn_pixel_base_coco_3x": (1.5e-4, 0.90, 0.3, [27, 33], 36),  # pixel_itpn_base_3x_ld090_dp030.py
    "cascade_mask_rcnn_itpn_pixel_base_coco_3x": (1e-4, 0.90, 0.2, [27, 33], 36),  # cascade_pixel_itpn_base_3x.py
    "cascade_mask_rcnn_itpn_base_coco_3x": (1e-4, 0.90, 0.2, [27, 33], 36),  # cascade_CLIP_itpn_base_3x.py
    "mask_rcnn_itpn_base_coco_1x": (2e-4, 0.90, 0.05, [9, 11], 12),      # none: the base 1x values
    "mask_rcnn_itpn_pixel_large_coco_1x": (2e-4, 0.95, 0.2, [9, 11], 12),  # none: clip_itpn_large_1x_ld095_dp020.py
}
# Every published dense recipe against the published constructors: recipe -> (rule, num_layers of the config).
PUBLISHED_DENSE_DECAY: dict[str, tuple[str, int]] = {
    **{r: ("mmdet_beit", 44 if "large" in r else 30) for r in PUBLISHED_DETECTION},
    "upernet_itpn_base_ade20k_512": ("mmseg_itpn", 44), "upernet_itpn_large_ade20k_512": ("mmseg_itpn", 44),
    "upernet_itpn_pixel_base_ade20k_512": ("mmseg_itpn", 30), "upernet_itpn_pixel_large_ade20k_512": ("mmseg_itpn", 44),
}

SHIPPED = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
PUBLISHED = [name for name in SHIPPED if name not in TEST_ONLY]
LR_RULE = re.compile(r"lr scaling: none|does not scale lr by the batch|scales its --blr by batch / 256")
BATCH = re.compile(r"global batch (\d+) (?:= (\d+) per rank x (\d+) ranks(?: x (\d+) accumulation steps)?"
                   r"|\((\d+) per GPU x (\d+) GPUs\))")


def recipe_text(recipe: str) -> str:
    return (RECIPES_DIR / f"{recipe}.yaml").read_text()


def command_of(recipe: str) -> str:
    if recipe in TEST_ONLY:
        return TEST_ONLY[recipe]
    if recipe not in EXPECTED:
        pytest.fail(f"recipe {recipe} has no expected parameter count: add "
                    f"'{recipe}': (COMMAND, COUNT) to EXPECTED in tests/test_recipes.py (COUNT from REFERENCE.md)")
    return EXPECTED[recipe][0]


def resolve(recipe: str):
    """The configuration ``itpn-ds COMMAND --config RECIPE`` runs (commands.main adds ``task=`` first)."""
    command = command_of(recipe)
    cfg = load_config(recipe, [f"task={command}"])
    assert load_config(recipe).task == cfg.task, f"{recipe} sets task {load_config(recipe).task}, run by {command}"
    return cfg


def build_on_meta(cfg) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(cfg)


@pytest.mark.parametrize("recipe", SHIPPED)
def test_recipe_builds_its_model_with_the_published_parameter_count(recipe):
    cfg = resolve(recipe)
    model = build_on_meta(cfg)
    img_size = getattr(model, "img_size", None) or model.dense_backbone.img_size  # a detector: its backbone's grid
    assert cfg.model.kwargs.get("img_size", 224) == img_size, \
        f"{recipe}: the loader feeds {cfg.model.kwargs.get('img_size', 224)} px to a {img_size} px model; " \
        "state model.kwargs.img_size"
    if recipe in TEST_ONLY:
        return
    count = sum(p.numel() for p in model.parameters())
    expected = EXPECTED[recipe][1]() if callable(EXPECTED[recipe][1]) else EXPECTED[recipe][1]
    assert count == expected, f"{recipe}: {count:,} parameters, published {expected:,}"


def test_position_delta_reproduces_the_published_256_px_fast_itpn_large():
    assert FAST_L + position_embedding_delta(768, 256) == 312_063_400  # REFERENCE.md


def test_every_expected_recipe_is_shipped():
    assert sorted(set(EXPECTED) - set(SHIPPED)) == []
    assert sorted(set(PUBLISHED_LAYER_DECAY) - set(SHIPPED)) == []


@pytest.mark.parametrize("recipe", [r for r in PUBLISHED if yaml.safe_load(recipe_text(r)).get("task") == "finetune"])
def test_finetune_recipe_crop_pct_follows_the_384_px_rule(recipe):
    cfg = resolve(recipe)
    size = cfg.model.kwargs.get("img_size", 224)
    crop_pct = eval_crop_pct(cfg.data.crop_pct, size)  # what the evaluation loader gets
    assert crop_pct == pytest.approx(224 / 256 if size < 384 else 1.0), \
        f"{recipe}: crop_pct {crop_pct} at {size} px (published: 224/256 below 384 px, 1.0 from 384 up)"


@pytest.mark.parametrize("recipe", PUBLISHED)
def test_recipe_header_states_a_global_batch_its_numbers_make(recipe):
    cfg = resolve(recipe)
    found = BATCH.search(recipe_text(recipe))
    assert found, f"{recipe}: state 'global batch N = M per rank x R ranks [x A accumulation steps]' in its header"
    batch, micro, ranks, accum, gpu_micro, gpus = found.groups()
    micro, ranks, accum = int(micro or gpu_micro), int(ranks or gpus), int(accum or 1)
    assert cfg.schedule.global_batch == int(batch), f"{recipe}: header says global batch {batch}, schedule.global_batch " \
                                                    f"is {cfg.schedule.global_batch}"
    plan = batch_plan(cfg, ranks)  # the published world size gets the published split
    assert (plan.micro_batch, plan.grad_accum) == (micro, accum), \
        f"{recipe}: header says {micro} per rank x {accum} steps, the engine takes {plan.describe()}"
    assert micro * ranks * accum == int(batch), f"{recipe}: {micro} x {ranks} x {accum} != {batch}"
    assert LR_RULE.search(recipe_text(recipe)), f"{recipe}: state the published lr-scaling rule in its header"


def published_itpn_lr_scales(model: torch.nn.Module, layer_decay: float) -> dict[str, float]:
    """The lr scale of every parameter as itpn_clip/utils/lr_decay.py computes it, written out independently:
    main_block = indices of blocks that are not merges, L = len(main_block) + 1, r = d ** (13 / L); a block's
    layer is its position in main_block + 1 (a merge: the block before it, or 0); embeddings 0; the rest L;
    scale = r ** (L − layer)."""
    from itpn_ds.models.layers import PatchMerge

    main_block = [i for i, blk in enumerate(model.blocks) if not isinstance(blk, PatchMerge)]
    num_layers = len(main_block) + 1
    rate = layer_decay ** (13 / num_layers)

    def layer_of(name: str) -> int:
        if name in ("cls_token", "pos_embed", "absolute_pos_embed", "mask_token") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks."):
            i = int(name.split(".")[1])
            while i >= 0 and i not in main_block:
                i -= 1
            return main_block.index(i) + 1 if i >= 0 else 0
        return num_layers

    return {name: rate ** (num_layers - layer_of(name)) for name, _ in model.named_parameters()}


@pytest.mark.parametrize("recipe", sorted(PUBLISHED_LAYER_DECAY))
def test_itpn_layer_decay_gives_every_parameter_the_published_rate(recipe):
    published, layers = PUBLISHED_LAYER_DECAY[recipe]
    cfg = resolve(recipe)
    assert (cfg.optim.layer_decay, cfg.optim.layer_decay_depth) == (published, 12), recipe
    model = build_on_meta(cfg)
    assert layers == model.num_lr_layers - 1, f"{recipe}: the script counts {layers} layers"
    expected = published_itpn_lr_scales(model, published)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, cfg.optim.layer_decay, cfg.optim.layer_decay_depth)
    ours = {names[id(p)]: group["lr_scale"] for group in groups for p in group["params"]}
    assert ours.keys() == expected.keys()
    wrong = {n: (ours[n], expected[n]) for n in ours if ours[n] != pytest.approx(expected[n], rel=1e-9)}
    assert not wrong, f"{recipe}: {len(wrong)} parameters off the published rate, e.g. {list(wrong.items())[:3]}"


def test_every_recipe_is_in_the_recipe_table():
    text = DOCS.read_text()
    missing = [name for name in SHIPPED if not re.search(rf"(?<!\w){name}(?!\w)", text)]
    assert not missing, f"docs/recipes.md does not list {missing}"


@pytest.mark.parametrize("recipe", sorted(PUBLISHED_DETECTION))
def test_detection_recipe_has_the_published_optimizer_and_schedule(recipe):
    lr, decay, drop_path, steps, epochs = PUBLISHED_DETECTION[recipe]
    cfg = resolve(recipe)
    o = cfg.optim
    assert (o.lr, o.layer_decay, o.layer_decay_depth, cfg.model.drop_path_rate) == (lr, decay, 0, drop_path)
    assert (o.schedule, o.lr_step_epochs, o.lr_step_gamma, cfg.schedule.epochs) == ("step", steps, 0.1, epochs)
    assert (o.weight_decay, o.weight_decay_end, o.betas, o.warmup_steps, o.clip_grad) == (0.05, 0.05, (0.9, 0.999), 500, 0)
    d = cfg.detect
    assert (d.short_sides, d.max_long_side, d.eval_short_side, d.eval_max_long_side) == \
        (list(range(480, 801, 32)), 1333, 800, 1333)
    # the DETR-style branch of the configs' AutoAugment: one of its two policies, resize 400/500/600, crop 384-600
    assert (d.flip_prob, d.crop_prob, d.crop_short_sides, d.crop_size) == (0.5, 0.5, [400, 500, 600], [384, 600])
    # the published box head: GIoU on decoded boxes, aligned RoIAlign, class-specific regression; cascade: 3 stages
    k = cfg.model.kwargs
    assert (k["box_loss"], k["roi_aligned"], k.get("class_agnostic", False)) == ("giou", True, False)
    assert k.get("roi_head", "standard") == ("cascade" if recipe.startswith("cascade") else "standard")


def published_dense_lr_scales(model: torch.nn.Module, prefix: str, rule: str, num_layers: int,
                              decay: float) -> dict[str, float]:
    """The lr scale of every parameter as the published dense constructors compute it, written out from their
    code: ids 0 (patch_embed, and backbone.pos_embed / backbone.absolute_pos_embed), blocks.i -> i + 1, the rest
    num_layers + 1; num_layers += 2; detection: decay ** (num_layers - id - 1), segmentation: (decay ** (13 /
    num_layers)) ** (num_layers - id - 1)."""
    total = num_layers + 2
    layer0 = ("backbone.pos_embed",) if rule == "mmdet_beit" else ("backbone.absolute_pos_embed",)
    rate = decay if rule == "mmdet_beit" else decay ** (13 / total)
    scales = {}
    for name, _ in model.named_parameters():
        var = "backbone." + name[len(prefix):] if name.startswith(prefix) else name  # the published module's name
        if var in layer0 or var.startswith("backbone.patch_embed"):
            layer = 0
        elif var.startswith("backbone.blocks"):
            layer = int(var.split(".")[2]) + 1
        else:
            layer = total - 1
        scales[name] = rate ** (total - layer - 1)
    return scales


@pytest.mark.parametrize("recipe", sorted(PUBLISHED_DENSE_DECAY))
def test_dense_layer_decay_gives_every_parameter_the_published_constructors_rate(recipe):
    rule, layers = PUBLISHED_DENSE_DECAY[recipe]
    cfg = resolve(recipe)
    o = cfg.optim
    assert (o.layer_decay_rule, o.layer_decay_layers) == (rule, layers)
    model = build_on_meta(cfg)
    expected = published_dense_lr_scales(model, model.backbone_prefix, rule, layers, o.layer_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, o.layer_decay, o.layer_decay_depth, o.layer_decay_rule, o.layer_decay_layers)
    ours = {names[id(p)]: group["lr_scale"] for group in groups for p in group["params"]}
    assert ours.keys() == expected.keys()
    wrong = {n: (ours[n], expected[n]) for n in ours if ours[n] != pytest.approx(expected[n], rel=1e-9)}
    assert not wrong, f"{recipe}: {len(wrong)} parameters off the published rate, e.g. {list(wrong.items())[:3]}"
    if rule == "mmdet_beit" and layers == 30:  # iTPN-B's 32 block entries: the last above the top, as published
        assert max(ours.values()) == pytest.approx(1 / o.layer_decay)
