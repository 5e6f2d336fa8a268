"""The iTPN model zoo: conformance with the published code, counts, gradients, checkpointing, errors."""
from pathlib import Path

import numpy as np
import pytest
import torch

import itpn_ds.models  # noqa: F401  (registers the timm names)
from itpn_ds.models import (create_model, CheckpointMismatchError, FastITPN, ITPN, ITPNClipDistill, ITPNPixelMAE,
                            load_weights)
from itpn_ds.models.flops import forward_flops
from itpn_ds.models.layers import Attention, attention_math, relative_position_index

REFERENCE = Path(__file__).parent / "data" / "reference"


def reference(name: str) -> dict:
    return torch.load(REFERENCE / f"{name}.pt", weights_only=True)


def build_from_fixture(cls, fixture: dict) -> torch.nn.Module:
    config = {k: v for k, v in fixture["config"].items() if k != "norm_pix_loss"}
    model = cls(**config).eval()
    load_weights(model, fixture["state_dict"])
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
    "fast_itpn_large_2240_patch16_256": 312_063_400,  # at the name's 256 px (its timm cfg's fixed input size)
    # pixel models: all parameters, as ``count_on_meta`` counts, the fixed decoder position embedding included
    "itpn_base_dec512d8b": 108_493_344,
    "itpn_large_dec512d8b": 318_339_808,
}


def count_on_meta(name: str, **kwargs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(name, **kwargs).parameters())


@pytest.mark.parametrize("name,expected", PUBLISHED_COUNTS.items())
def test_registered_models_have_published_parameter_counts(name, expected):
    assert count_on_meta(name) == expected


def test_clip_pretraining_counts_without_layer_scale():
    assert count_on_meta("clip_tpn_base_3324_patch16_224", init_values=0) == 88_973_168
    assert count_on_meta("clip_tpn_large_2240_patch16_224", init_values=0) == 307_387_240


def test_registered_model_at_256_px_builds():
    assert count_on_meta("clip_tpn_large_2240_patch16_256") > 300_000_000


@pytest.mark.parametrize("name", ["itpn_base_dec512d8b", "itpn_large_dec512d8b"])
def test_pixel_models_have_two_block_pyramid_and_a_trainable_sincos_position_embedding(name):
    with torch.device("meta"):
        model = create_model(name)
    names = {n for n, _ in model.named_parameters()}
    assert {"block_16to8.1.mlp.fc1.weight", "block_8to4.1.mlp.fc1.weight"} <= names
    assert "block_16to8.2.mlp.fc1.weight" not in names
    assert model.absolute_pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == PUBLISHED_COUNTS[name] - model.decoder_pos_embed.numel()


def test_pixel_position_embedding_is_sincos_initialised():
    from itpn_ds.models.pixel_mae import sincos_2d

    model = ITPNPixelMAE(mlp_depth=1, img_size=64, embed_dim=64, depth=2, num_heads=2, fpn_dim=32,
                         decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    assert torch.equal(model.absolute_pos_embed.detach(), sincos_2d(64, 4)[None])


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


def assert_checkpointing_keeps_gradients(model: torch.nn.Module, loss_fn, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Checkpointing every block and every 2nd block gives the plain run's gradients; returns those."""
    plain = gradients(model, loss_fn, x)
    for every_k in (1, 2):
        model.set_grad_checkpointing(True, every_k=every_k)
        ckpt = gradients(model, loss_fn, x)
        assert ckpt.keys() == plain.keys()
        for name in plain:
            torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    return plain


@pytest.mark.parametrize("kind", ["itpn", "clip", "pixel", "fast"])
def test_forward_backward_and_checkpointing_gives_same_gradients(kind):
    model, loss_fn = tiny_models()[kind]
    model.train()
    x = torch.randn(2, 3, 64, 64)
    plain = assert_checkpointing_keeps_gradients(model, loss_fn, x)
    assert plain and all(torch.isfinite(g).all() for g in plain.values())
    model.set_grad_checkpointing(False)
    assert model.grad_ckpt_every == 0


def test_sdpa_attention_equals_plain_math_with_position_bias():
    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=4, rpe_grid=3)
    torch.nn.init.normal_(attn.relative_position_bias_table)
    index = relative_position_index(3).view(-1)
    x = torch.randn(2, 9, 32)
    q, k, v = attn.qkv_heads(x)
    expected = attn.proj(attention_math(q, k, v, attn.position_bias(index, 9)).transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(attn(x, index), expected, atol=1e-5, rtol=1e-5)


def test_bad_inputs_get_clear_errors():
    model = ITPN(num_classes=5, **TINY).eval()
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.randn(1, 3, 60, 60))
    with pytest.raises(ValueError, match="built for 64 px inputs"):
        model(torch.randn(1, 3, 96, 96))
    clip = ITPNClipDistill(teacher_dim=24, fpn_dim=32, **TINY).eval()
    with pytest.raises(ValueError, match="bool_masked_pos must be"):
        clip(torch.randn(1, 3, 64, 64), torch.zeros(1, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ITPN(img_size=70, patch_size=16)


def test_loader_names_the_keys_on_each_side_and_the_fix():
    fx = reference("itpn_classifier")
    model = build_from_fixture(ITPN, fx)
    sd = dict(fx["state_dict"])
    sd.pop("blocks.5.mlp.fc1.weight")
    sd["surprise.weight"] = torch.zeros(1)
    names_both = (r"checkpoint keys the model lacks \(surprise.weight\); "
                  r"1 model keys the checkpoint lacks \(blocks.5.mlp.fc1.weight\); fix: build")
    with pytest.raises(CheckpointMismatchError, match=names_both):
        load_weights(model, {"model": sd})


CLIP_FIXTURE_BACKBONE = ("teacher_dim", "fpn_dim", "fpn_depth")


def classifier_for(fixture: dict, **overrides) -> ITPN:
    """The classifier of the fixture's backbone (its config without the pre-training arguments)."""
    config = {k: v for k, v in fixture["config"].items() if k not in CLIP_FIXTURE_BACKBONE}
    return ITPN(**{**config, "num_outs": 1, "num_classes": 7, **overrides})


def published_pretraining_file(path: Path, state_dict: dict) -> Path:
    """A .pth as the published pre-training saves it: {'model', 'optimizer', 'epoch', 'args'}, here with the
    DDP ``module.`` prefix the file gets when the wrapped model is saved."""
    import argparse

    torch.save({"model": {f"module.{k}": v for k, v in state_dict.items()},
                "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3}]},
                "epoch": 299, "args": argparse.Namespace(model="clip_tpn_base_3324_patch16_224", lr=1.5e-3)}, path)
    return path


def test_classifier_from_published_pretraining_keeps_layer_scale_and_only_its_head_is_new():
    fx = reference("itpn_clip_pretrain")
    classifier = classifier_for(fx)
    head_at_init = {k: v.clone() for k, v in classifier.state_dict().items() if k.startswith(("head.", "fc_norm."))}
    report = load_weights(classifier, {"module": fx["state_dict"]})
    assert report.fresh == sorted(head_at_init) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert {"lm_head.weight", "mask_token", "norm.weight", "block_16to8.0.mlp.fc1.weight"} <= set(report.dropped)
    assert not any(k.startswith("blocks.") for k in report.dropped) and not report.reinitialised
    state = classifier.state_dict()
    gammas = [k for k in fx["state_dict"] if k.startswith("blocks.") and ".gamma_" in k]
    assert len(gammas) > 10 and all(torch.equal(state[k], fx["state_dict"][k]) for k in gammas)
    assert all(torch.equal(state[k], v) for k, v in head_at_init.items())
    assert set(report.loaded) == set(state) - set(head_at_init) - {"relative_position_index"}


@pytest.mark.parametrize("init_values,fix", [(0, "add model.kwargs.init_values=0.1"),
                                              (0.1, "the checkpoint has no layer scale: model.kwargs.init_values=0")])
def test_layer_scale_on_one_side_only_is_refused_with_the_setting_to_change(init_values, fix):
    fx = reference("itpn_clip_pretrain")
    sd = fx["state_dict"] if init_values == 0 else {k: v for k, v in fx["state_dict"].items() if ".gamma_" not in k}
    with pytest.raises(CheckpointMismatchError, match=f"gamma_.*fix: .*{fix}"):
        load_weights(classifier_for(fx, init_values=init_values), sd)


def test_classification_checkpoint_loads_its_head_or_reinitialises_it_for_another_class_count():
    fx = reference("itpn_classifier")
    config = {k: v for k, v in fx["config"].items() if k != "num_classes"}
    same = ITPN(**config, num_classes=10)
    report = load_weights(same, fx["state_dict"])
    assert not report.fresh and not report.reinitialised and not report.dropped
    assert torch.equal(same.head.weight, fx["state_dict"]["head.weight"])
    other = ITPN(**config, num_classes=3)  # e.g. ImageNet-21K -> 1K intermediate fine-tuning
    head_at_init = other.head.weight.clone()
    report = load_weights(other, fx["state_dict"])
    assert report.reinitialised == ["head.bias", "head.weight"] and not report.fresh
    assert torch.equal(other.head.weight, head_at_init)
    assert torch.equal(other.fc_norm.weight, fx["state_dict"]["fc_norm.weight"])
    with pytest.raises(CheckpointMismatchError, match=r"leaves 2 keys of ITPN at their initialisation \(head.bias"):
        load_weights(ITPN(**config, num_classes=3), fx["state_dict"], strict=True)


def test_fast_itpn_from_pretraining_keeps_its_final_norm_new_and_from_classification_loads_it():
    fx = reference("fast_itpn_classifier")
    backbone = {k: v for k, v in fx["state_dict"].items() if not k.startswith(("head.", "norm."))}
    pretraining = {**backbone, "mask_token": torch.zeros(1, 1, 64), "lm_head.weight": torch.zeros(48, 64),
                   "norm.weight": torch.full((64,), 3.0), "norm.bias": torch.ones(64)}  # the fused-pyramid norm
    model = FastITPN(**fx["config"])
    report = load_weights(model, pretraining)
    assert report.fresh == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert {"lm_head.weight", "mask_token", "norm.weight", "norm.bias"} == set(report.dropped)
    assert torch.equal(model.norm.weight, torch.ones(64))
    classified = FastITPN(**fx["config"])
    assert not load_weights(classified, fx["state_dict"]).fresh
    assert torch.equal(classified.norm.weight, fx["state_dict"]["norm.weight"])


def test_classifier_from_pixel_pretraining_starts_its_relative_position_bias_at_zero_as_published():
    pixel = ITPNPixelMAE(mlp_depth=1, img_size=64, embed_dim=64, depth=4, num_heads=2, fpn_dim=32,
                         decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    classifier = ITPN(num_classes=5, **TINY)  # no layer scale: pixel models have none
    report = load_weights(classifier, pixel.state_dict())
    tables = [f"blocks.{i}.attn.relative_position_bias_table" for i in range(4, 8)]
    assert report.fresh == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight", *tables]
    assert all(not classifier.get_parameter(t).any() for t in tables)
    assert torch.equal(classifier.absolute_pos_embed, pixel.absolute_pos_embed)


def test_strict_loading_refuses_a_pretraining_checkpoint():
    fx = reference("itpn_clip_pretrain")
    with pytest.raises(CheckpointMismatchError, match=r"leaves 4 keys .*fc_norm.bias.*give a checkpoint of this"):
        load_weights(classifier_for(fx), fx["state_dict"], strict=True)


def test_position_embedding_is_resized_for_another_resolution():
    fx = reference("fast_itpn_classifier")
    config = dict(fx["config"], img_size=96)
    model = FastITPN(**config)
    report = load_weights(model, fx["state_dict"])
    assert report.resized == ["pos_embed"] and model.pos_embed.shape == (1, 36, 64)
    assert torch.isfinite(model(torch.randn(1, 3, 96, 96))).all()


def keys_cubic(d: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel at distances ``d`` (the kernel of torch's and OpenCV's bicubic)."""
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def bicubic_matrix(n: int, m: int) -> np.ndarray:
    """(m, n) weights resampling n samples to m: half-pixel centres (align_corners=False), edges replicated."""
    weights = np.zeros((m, n))
    for i in range(m):
        x = (i + 0.5) * n / m - 0.5
        base = int(np.floor(x))
        for k in range(base - 1, base + 3):
            weights[i, min(max(k, 0), n - 1)] += keys_cubic(np.array(x - k))
    return weights


def test_relative_position_bias_is_resized_per_head_for_another_resolution():
    torch.manual_seed(0)
    small = ITPN(num_classes=5, **TINY)
    for name, p in small.named_parameters():
        if name.endswith("relative_position_bias_table"):
            torch.nn.init.normal_(p)
    big = ITPN(num_classes=5, **{**TINY, "img_size": 96})
    report = load_weights(big, small.state_dict())
    tables = [f"blocks.{i}.attn.relative_position_bias_table" for i in range(4, 8)]
    assert report.resized == sorted(["absolute_pos_embed", *tables]) and not report.fresh
    rows = bicubic_matrix(7, 11)  # 4 x 4 patches: 7 x 7 offsets; 6 x 6 patches: 11 x 11
    for name in tables:
        source = small.get_parameter(name).detach().double().numpy()  # (49, heads)
        expected = np.stack([rows @ source[:, h].reshape(7, 7) @ rows.T for h in range(2)], -1).reshape(121, 2)
        np.testing.assert_allclose(big.get_parameter(name).detach().numpy(), expected, atol=1e-5, rtol=0)
    assert torch.equal(big.relative_position_index, relative_position_index(6))
    assert torch.isfinite(big(torch.randn(1, 3, 96, 96))).all()


def test_timm_pretrained_loads_an_official_file(tmp_path):
    fx = reference("itpn_classifier")
    path = tmp_path / "official.pth"
    torch.save({"model": fx["state_dict"], "epoch": 3}, path)
    overrides = dict(img_size=64, embed_dim=64, mlp_depth1=1, mlp_depth2=1, depth=2, num_heads=2, num_classes=10,
                     init_values=0.1)
    model = create_model("itpn_base_3324_patch16_224", pretrained=True,
                         pretrained_cfg_overlay=dict(file=str(path)), **overrides).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(fx["input"]), fx["output"], atol=1e-5, rtol=0)
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        create_model("itpn_base_3324_patch16_224", pretrained=True,
                     pretrained_cfg_overlay=dict(file=str(tmp_path / "missing.pth")), **overrides)
    with pytest.raises(RuntimeError, match="No pretrained weights exist"):  # nothing to download
        create_model("itpn_base_3324_patch16_224", pretrained=True, **overrides)


def test_timm_pretrained_classifier_starts_from_a_published_pretraining_file(tmp_path):
    fx = reference("itpn_clip_pretrain")
    path = published_pretraining_file(tmp_path / "checkpoint-299.pth", fx["state_dict"])
    overrides = {k: v for k, v in fx["config"].items() if k not in (*CLIP_FIXTURE_BACKBONE, "num_outs")}
    model = create_model("itpn_base_3324_patch16_224", pretrained=True,
                         pretrained_cfg_overlay=dict(file=str(path)), num_classes=7, **overrides)
    for name, value in model.state_dict().items():
        if name in fx["state_dict"]:
            assert torch.equal(value, fx["state_dict"][name]), name
    assert not {"head.weight", "fc_norm.weight"} & set(fx["state_dict"])


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
        base = create_model("itpn_base_3324_patch16_224")
    flops = forward_flops(base)
    # matmul FLOPs of the 24 main blocks alone: 24 · 2 · 196 · (12 D² + 2 · 196 · D) with D = 512
    main = 24 * 2 * 196 * (12 * 512 ** 2 + 2 * 196 * 512)
    assert main < flops < 1.6 * main
