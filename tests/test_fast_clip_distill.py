"""Fast-iTPN CLIP pre-training model (ours): layout, masking, gradients, counts, metadata, engine checks."""
import pytest
import torch

import itpn_ds.models  # noqa: F401  (registers the timm names)
from itpn_ds.config import ConfigError, load_config
from itpn_ds.engine.model import build_model
from itpn_ds.engine.tasks.pretrain import check_objective
from itpn_ds.models import create_model, MODEL_CONFIGS, FastITPN, FastITPNClipDistill
from itpn_ds.models.fast_itpn import ConvStem
from itpn_ds.models.flops import forward_flops
from itpn_ds.models.itpn import tokens_to_map
from itpn_ds.models.layers import PatchEmbed
from itpn_ds.models.pyramid import patch_maps_from_nchw
from tests.test_models import assert_checkpointing_keeps_gradients

# 80 px: a 5 x 5 patch grid (odd, so a transposed layout cannot pass); depth 5: the auxiliary head branches off
# main block int(0.75 * 5) = 3, before the last one.
TINY = dict(img_size=80, embed_dim=64, depth_stage1=1, depth_stage2=1, depth=5, num_heads=2)
GRID, N, TEACHER_DIM = 5, 25, 24


def tiny_model(**kwargs) -> FastITPNClipDistill:
    torch.manual_seed(0)
    return FastITPNClipDistill(teacher_dim=TEACHER_DIM, fpn_dim=32, **{**TINY, **kwargs})


def block_mask(batch: int = 2) -> torch.Tensor:
    mask = torch.zeros(batch, N, dtype=torch.bool)
    mask[0, [0, 1, 5, 6, 12]] = True
    mask[1, 15:24] = True
    return mask


def patch_pixels(patch: int) -> tuple[slice, slice]:
    row, col = divmod(patch, GRID)
    return slice(16 * row, 16 * row + 16), slice(16 * col, 16 * col + 16)


def test_outputs_are_per_token_teacher_predictions():
    model = tiny_model().eval()
    main, aux = model(torch.randn(2, 3, 80, 80), block_mask())
    assert main.shape == aux.shape == (2, N, TEACHER_DIM)
    assert model.aux_block_index == 3 and len(model.cls_pt_layers) == 2
    with pytest.raises(ValueError, match="bool_masked_pos must be"):
        model(torch.randn(2, 3, 80, 80), torch.zeros(2, N - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="built for 80 px inputs"):
        model(torch.randn(1, 3, 96, 96), torch.zeros(1, 36, dtype=torch.bool))
    with pytest.raises(ValueError, match="2 or 3 levels"):
        tiny_model(num_outs=1)


def test_stage_maps_in_patch_layout_equal_hivits_patch_embedding():
    """patch_maps_from_nchw puts Fast-iTPN's NCHW maps in HiViT's (B, N, s, s, C) layout (same conv, same
    result) and is the inverse of tokens_to_map."""
    torch.manual_seed(0)
    stem, embed = ConvStem(16, 8), PatchEmbed(16, 8)
    embed.load_state_dict(stem.state_dict())
    x = torch.randn(2, 3, 80, 80)
    maps = patch_maps_from_nchw(stem(x), GRID)
    torch.testing.assert_close(maps, embed(x), atol=0, rtol=0)
    torch.testing.assert_close(tokens_to_map(maps, GRID), stem(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="multiple of the patch grid 5"):
        patch_maps_from_nchw(torch.randn(1, 8, 18, 18), GRID)


def test_early_stages_act_within_each_16px_patch():
    """Changing one patch's pixels changes that patch's stage maps and stage-2 token only: masking per patch
    after the stage-2 merge hides the patch from the main blocks, as in HiViT."""
    model = tiny_model().eval()
    x = torch.randn(1, 3, 80, 80)
    edited = x.clone()
    rows, cols = patch_pixels(7)
    edited[..., rows, cols] = torch.randn(3, 16, 16)
    with torch.no_grad():
        (tokens, maps), (tokens2, maps2) = model.forward_stages(x), model.forward_stages(edited)
    changed = lambda a, b: (a - b).flatten(2).abs().amax(-1)[0] > 0  # noqa: E731  per patch, (N,)
    expected = torch.zeros(N, dtype=torch.bool)
    expected[7] = True
    assert torch.equal(changed(tokens, tokens2), expected)
    for m, m2 in zip(maps, maps2):
        assert torch.equal(changed(patch_maps_from_nchw(m, GRID), patch_maps_from_nchw(m2, GRID)), expected)


def test_masking_acts_only_through_the_mask_token():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 80, 80)
    mask = block_mask()
    none = torch.zeros_like(mask)
    with torch.no_grad():
        unmasked = model(x, none)
        model.mask_token.normal_()
        torch.testing.assert_close(model(x, none), unmasked, atol=0, rtol=0)  # no mask: the token is unused
        masked = model(x, mask)
        assert not torch.allclose(masked[1], unmasked[1])
        # new pixels inside the masked patches: the auxiliary output (main blocks only) does not change ...
        edited = x.clone()
        for b in range(2):
            for patch in mask[b].nonzero().flatten().tolist():
                rows, cols = patch_pixels(patch)
                edited[b, :, rows, cols] = torch.randn(3, 16, 16)
        main, aux = model(edited, mask)
        torch.testing.assert_close(aux, masked[1], atol=1e-6, rtol=0)
        assert not torch.allclose(main, masked[0])  # ... the main one does, through the lateral pyramid inputs,
        model.align_dim_16to8.weight.zero_()       # as in the published iTPN; without them it does not either
        model.align_dim_8to4.weight.zero_()
        torch.testing.assert_close(model(edited, mask)[0], model(x, mask)[0], atol=1e-6, rtol=0)


def test_checkpointing_gives_the_same_gradients():
    model = tiny_model(drop_path_rate=0.0).train()
    mask = block_mask()
    loss_fn = lambda m, x: sum(o.square().mean() for o in m(x, mask))  # noqa: E731
    x = torch.randn(2, 3, 80, 80)
    plain = assert_checkpointing_keeps_gradients(model, loss_fn, x)
    assert "mask_token" in plain and "blocks.0.mlp.fc1.weight" in plain and "cls_pt_layers.1.attn.q_bias" in plain


# size -> (pre-training model's count, the Fast-iTPN classifier's arguments and its count in REFERENCE.md)
COUNTS = {
    "tiny_1112_patch16_224": (31_868_632, {}, 24_219_976),
    "small_2220_patch16_224": (47_551_576, {}, 39_902_920),
    "base_3324_patch16_224": (95_762_208, {}, 84_825_192),
    "large_2240_patch16_256": (332_133_040, dict(img_size=256), 312_063_400),
}


@pytest.mark.parametrize("size", COUNTS)
def test_registered_pretraining_models_hold_the_whole_fast_itpn_backbone(size):
    expected, classifier_kwargs, classifier_count = COUNTS[size]
    with torch.device("meta"):
        pretrain = create_model(f"fast_clip_tpn_{size}").state_dict()
        classifier = create_model(f"fast_itpn_{size}", **classifier_kwargs).state_dict()
    assert sum(v.numel() for v in pretrain.values()) == expected
    assert sum(v.numel() for v in classifier.values()) == classifier_count
    backbone = {k: v for k, v in classifier.items() if not k.startswith(("head.", "norm."))}
    assert {k: v.shape for k, v in backbone.items()} == {k: pretrain[k].shape for k in backbone}
    head_and_norm = sum(v.numel() for k, v in classifier.items() if k not in backbone)
    assert sum(v.numel() for v in backbone.values()) == classifier_count - head_and_norm
    extra = {k.split(".")[0] for k in pretrain if k not in backbone}
    assert extra == {"mask_token", "lm_head", "lm_cls_head", "norm", "norm_cls", "cls_pt_layers", "decoder_embed",
                     "fpn_modules", "align_dim_16tofpn", "align_dim_16to8", "align_dim_8to4", "split_16to8",
                     "split_8to4", "block_16to8", "block_8to4"}


def test_optimizer_metadata_covers_the_pretraining_parts():
    model = tiny_model()
    no_wd = model.no_weight_decay()
    assert {"pos_embed", "mask_token", "blocks.4.gamma_1", "blocks.4.attn.q_bias", "cls_pt_layers.0.norm1.weight",
            "fpn_modules.0.mlp.fc1.bias", "lm_head.bias"} <= no_wd
    assert not {"blocks.4.attn.q_proj.weight", "cls_pt_layers.0.mlp.w1.weight", "lm_head.weight"} & no_wd
    assert model.num_lr_layers == len(model.blocks) + 2 == 11
    assert [model.lr_layer_id(n) for n in ("patch_embed.proj.weight", "pos_embed", "mask_token",
                                           "blocks.1.reduction.weight", "blocks.8.mlp.w3.weight")] == [0, 0, 0, 2, 9]
    assert {model.lr_layer_id(n) for n in ("cls_pt_layers.1.mlp.w1.weight", "fpn_modules.2.mlp.fc1.weight",
                                           "decoder_embed.0.1.weight", "lm_cls_head.weight", "norm.weight")} == {10}


def test_forward_flops_cover_backbone_pyramid_and_heads():
    with torch.device("meta"):
        pretrain = create_model("fast_clip_tpn_base_3324_patch16_224")
        classifier = create_model("fast_itpn_base_3324_patch16_224")
    D, tokens = 512, 196
    block = 2 * tokens * (13 * D ** 2 + 2 * tokens * D)  # q, k, v, proj + SwiGLU (3 x D x 3D), attention
    assert 24 * block < forward_flops(classifier) < 1.2 * 24 * block
    assert forward_flops(classifier) + 2 * block < forward_flops(pretrain) < 1.6 * 24 * block


def built_for_pretraining(cfg):
    """The model as a pre-training run gets it: built, then checked against the objective."""
    model = build_model(cfg)
    check_objective(cfg, model)
    return model


def test_engine_builds_the_model_for_the_clip_objective_only():
    assert isinstance(built_for_pretraining(load_config("tiny_fast_pretrain_cpu", [])), FastITPNClipDistill)
    with pytest.raises(ConfigError, match=r"pretrain.objective=pixel needs an ITPNPixelMAE model"):
        built_for_pretraining(load_config("tiny_fast_pretrain_cpu", ["pretrain.objective=pixel"]))
    family = r"needs a CLIP-distillation model \(clip_tpn_\*, fast_clip_tpn_\*\).*builds FastITPN"
    with pytest.raises(ConfigError, match=family):
        built_for_pretraining(load_config("tiny_fast_finetune_cpu", ["task=pretrain"]))
    assert isinstance(build_model(load_config("tiny_fast_finetune_cpu", [])), FastITPN)


@pytest.mark.parametrize("size, drop_path", [("tiny", 0.1), ("small", 0.1), ("base", 0.1), ("large", 0.2)])
def test_pretraining_recipes_match_the_student_grid_to_the_teachers(size, drop_path):
    cfg = load_config(f"fast_itpn_{size}_clip_l_pretrain")
    img_size = cfg.model.kwargs.get("img_size", 224)  # what the data pipeline reads
    assert img_size == MODEL_CONFIGS[cfg.model.name][1].get("img_size", 224)
    assert img_size // 16 == cfg.teacher.resolution // 14  # CLIP-L/14 tokens = student tokens
    assert (cfg.model.kwargs["teacher_dim"], cfg.model.kwargs["init_values"], cfg.model.drop_path_rate,
            cfg.optim.lr, cfg.pretrain.objective) == (768, 0.1, drop_path, 1.5e-3, "clip")
