"""The iTPN model zoo: conformance with the published code, counts, gradients, checkpointing, errors."""
from pathlib import Path

import pytest
import timm
import torch

import itpn_ds  # noqa: F401  (registers the timm names)
from itpn_ds.models import (CheckpointMismatchError, FastITPN, ITPN, ITPNClipDistill, ITPNPixelMAE,
                            load_official_state_dict)
from itpn_ds.models.flops import forward_flops
from itpn_ds.models.layers import Attention, attention_math

REFERENCE = Path(__file__).parent / "data" / "reference"


def reference(name: str) -> dict:
    return torch.load(REFERENCE / f"{name}.pt", weights_only=True)


def build_from_fixture(cls, fixture: dict) -> torch.nn.Module:
    config = {k: v for k, v in fixture["config"].items() if k != "norm_pix_loss"}
    model = cls(**config).eval()
    load_official_state_dict(model, fixture["state_dict"])
    return model


@pytest.mark.parametrize("name,cls", [("itpn_classifier", ITPN), ("fast_itpn_classifier", FastITPN)])
def test_classifiers_reproduce_published_outputs(name, cls):
    fx = reference(name)
    with torch.no_grad():
        out = build_from_fixture(cls, fx)(fx["input"])
    torch.testing.assert_close(out, fx["output"], atol=1e-5, rtol=0)


def test_clip_distill_reproduces_published_outputs():
    fx = reference("itpn_clip_pretrain")
    with torch.no_grad():
        main, aux = build_from_fixture(ITPNClipDistill, fx)(fx["input"], fx["bool_masked_pos"])
    torch.testing.assert_close(main, fx["output_main"], atol=1e-5, rtol=0)
    torch.testing.assert_close(aux, fx["output_aux"], atol=1e-5, rtol=0)


def test_pixel_mae_reproduces_published_outputs():
    fx = reference("itpn_pixel_pretrain")
    with torch.no_grad():
        loss, pred, mask = build_from_fixture(ITPNPixelMAE, fx)(fx["input"], ids_keep=fx["ids_keep"],
                                                                ids_restore=fx["ids_restore"])
    torch.testing.assert_close(pred, fx["pred"], atol=1e-5, rtol=0)
    torch.testing.assert_close(mask, fx["mask"].float(), atol=0, rtol=0)
    assert abs(loss.item() - fx["loss"].item()) < 1e-4


PUBLISHED_COUNTS = {
    "itpn_base_3324_patch16_224": 78_557_992,
    "itpn_large_2240_patch16_224": 288_493_576,
    "clip_tpn_base_3324_patch16_224": 89_000_944,
    "clip_tpn_large_2240_patch16_224": 307_452_904,
    "fast_itpn_tiny_1112_patch16_224": 24_219_976,
    "fast_itpn_small_2220_patch16_224": 39_902_920,
    "fast_itpn_base_3324_patch16_224": 84_825_192,
    "fast_itpn_large_2240_patch16_256": 312_017_320,
}


def count_on_meta(name: str, **kwargs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name, **kwargs).parameters())


@pytest.mark.parametrize("name,expected", PUBLISHED_COUNTS.items())
def test_registered_models_have_published_parameter_counts(name, expected):
    assert count_on_meta(name) == expected


def test_clip_pretraining_counts_without_layer_scale():
    assert count_on_meta("clip_tpn_base_3324_patch16_224", init_values=0) == 88_973_168
    assert count_on_meta("clip_tpn_large_2240_patch16_224", init_values=0) == 307_387_240


@pytest.mark.parametrize("name", ["clip_tpn_large_2240_patch16_256", "itpn_base_dec512d8b", "itpn_large_dec512d8b"])
def test_other_registered_models_build(name):
    assert count_on_meta(name) > 100_000_000


TINY = dict(img_size=64, patch_size=16, embed_dim=64, mlp_depth1=1, mlp_depth2=1, depth=4, num_heads=2)


def tiny_models() -> dict[str, tuple[torch.nn.Module, callable]]:
    torch.manual_seed(0)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :6] = True
    ids = torch.stack([torch.randperm(16) for _ in range(2)])
    restore = ids.argsort(1)
    return {
        "itpn": (ITPN(num_classes=5, init_values=0.1, **TINY), lambda m, x: m(x).sum()),
        "clip": (ITPNClipDistill(teacher_dim=24, fpn_dim=32, **TINY), lambda m, x: sum(o.sum() for o in m(x, mask))),
        "pixel": (ITPNPixelMAE(mlp_depth=1, **{k: v for k, v in TINY.items() if not k.startswith("mlp_depth")},
                               fpn_dim=32, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
                  lambda m, x: m(x, ids_keep=ids[:, :4], ids_restore=restore)[0]),
        "fast": (FastITPN(num_classes=5, depth_stage1=1, depth_stage2=1, depth=2, img_size=64, embed_dim=64,
                          num_heads=2), lambda m, x: m(x).sum()),
    }


def gradients(model: torch.nn.Module, loss_fn, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss_fn(model, x).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["itpn", "clip", "pixel", "fast"])
def test_forward_backward_and_checkpointing_gives_same_gradients(kind):
    model, loss_fn = tiny_models()[kind]
    model.train()
    x = torch.randn(2, 3, 64, 64)
    plain = gradients(model, loss_fn, x)
    assert plain and all(torch.isfinite(g).all() for g in plain.values())
    for every_k in (1, 2):
        model.set_grad_checkpointing(True, every_k=every_k)
        ckpt = gradients(model, loss_fn, x)
        assert ckpt.keys() == plain.keys()
        for name in plain:
            torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    model.set_grad_checkpointing(False)
    assert model.grad_ckpt_every == 0


def test_sdpa_attention_equals_plain_math_with_position_bias():
    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=4, rpe_grid=3)
    torch.nn.init.normal_(attn.relative_position_bias_table)
    from itpn_ds.models.layers import relative_position_index
    index = relative_position_index(3).view(-1)
    x = torch.randn(2, 9, 32)
    q, k, v = attn.qkv_heads(x)
    expected = attn.proj(attention_math(q, k, v, attn.position_bias(index)).transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(attn(x, index), expected, atol=1e-5, rtol=1e-5)


def test_bad_inputs_get_clear_errors():
    model = ITPN(num_classes=5, **TINY).eval()
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.randn(1, 3, 60, 60))
    with pytest.raises(ValueError, match="relative position bias for 64 px"):
        model(torch.randn(1, 3, 96, 96))
    clip = ITPNClipDistill(teacher_dim=24, fpn_dim=32, **TINY).eval()
    with pytest.raises(ValueError, match="bool_masked_pos must be"):
        clip(torch.randn(1, 3, 64, 64), torch.zeros(1, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ITPN(img_size=70, patch_size=16)


def test_loader_is_strict_and_names_keys():
    fx = reference("itpn_classifier")
    model = build_from_fixture(ITPN, fx)
    sd = dict(fx["state_dict"])
    sd.pop("head.weight")
    sd["surprise.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \['head.weight'\].*unexpected keys \['surprise"):
        load_official_state_dict(model, {"model": sd})


def test_classifier_from_pretraining_checkpoint_drops_pretraining_keys():
    fx = reference("itpn_clip_pretrain")
    config = {k: v for k, v in fx["config"].items() if k not in ("teacher_dim", "fpn_dim", "fpn_depth")}
    classifier = ITPN(**{**config, "num_outs": 1})
    sd = dict(fx["state_dict"], **{k: v for k, v in classifier.state_dict().items() if k.startswith(("fc_norm", "head"))})
    report = load_official_state_dict(classifier, {"module": sd})
    assert "lm_head.weight" in report.dropped and "mask_token" in report.dropped
    assert not any(k.startswith("blocks.") for k in report.dropped)
    torch.testing.assert_close(classifier.blocks[5].attn.qkv.weight, fx["state_dict"]["blocks.5.attn.qkv.weight"])


def test_position_embedding_is_resized_for_another_resolution():
    fx = reference("fast_itpn_classifier")
    config = dict(fx["config"], img_size=96)
    model = FastITPN(**config)
    report = load_official_state_dict(model, fx["state_dict"])
    assert report.resized == ["pos_embed"] and model.pos_embed.shape == (1, 36, 64)
    assert torch.isfinite(model(torch.randn(1, 3, 96, 96))).all()


def test_timm_pretrained_loads_an_official_file(tmp_path):
    fx = reference("itpn_classifier")
    path = tmp_path / "official.pth"
    torch.save({"model": fx["state_dict"], "epoch": 3}, path)
    overrides = dict(img_size=64, embed_dim=64, mlp_depth1=1, mlp_depth2=1, depth=2, num_heads=2, num_classes=10,
                     init_values=0.1)
    model = timm.create_model("itpn_base_3324_patch16_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)), **overrides).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(fx["input"]), fx["output"], atol=1e-5, rtol=0)
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        timm.create_model("itpn_base_3324_patch16_224", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "missing.pth")), **overrides)
    with pytest.raises(ValueError, match="needs a local file"):
        timm.create_model("itpn_base_3324_patch16_224", pretrained=True, **overrides)


def test_layer_ids_follow_published_layer_decay_semantics():
    model = ITPN(num_classes=5, **TINY)
    # blocks: MLP, merge, MLP, merge, 4 attention blocks; itpn_clip/utils/lr_decay.py gives a merge the layer of
    # the block before it, so 6 block layers between the embedding (0) and the head (7)
    assert model.num_lr_layers == len(model.blocks) - 2 + 2 == 8
    assert model.lr_layer_id("patch_embed.proj.weight") == 0
    assert model.lr_layer_id("absolute_pos_embed") == 0
    assert model.lr_layer_id("blocks.0.mlp.fc1.weight") == model.lr_layer_id("blocks.1.reduction.weight") == 1
    assert model.lr_layer_id("blocks.2.mlp.fc1.weight") == model.lr_layer_id("blocks.3.reduction.weight") == 2
    assert model.lr_layer_id("blocks.7.attn.qkv.weight") == 6
    assert model.lr_layer_id("head.weight") == 7
    no_wd = model.no_weight_decay()
    assert {"absolute_pos_embed", "blocks.4.attn.relative_position_bias_table", "blocks.4.norm1.weight",
            "blocks.4.attn.qkv.bias"} <= no_wd
    assert "blocks.4.attn.qkv.weight" not in no_wd


def test_forward_flops_from_architecture():
    with torch.device("meta"):
        base = timm.create_model("itpn_base_3324_patch16_224")
    flops = forward_flops(base)
    # matmul FLOPs of the 24 main blocks alone: 24 · 2 · 196 · (12 D² + 2 · 196 · D) with D = 512
    main = 24 * 2 * 196 * (12 * 512 ** 2 + 2 * 196 * 512)
    assert main < flops < 1.6 * main
