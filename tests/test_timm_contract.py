"""timm's model contract for the names we register (tiny sizes): pretrained cfgs and the published evaluation
transform, loading through our rule (a file, a local-dir export), the classifier API, TorchScript and FX, the
layer-decay groups of timm's optimizer factory, and the split between timm's registry and ours.
timm's own tests/test_models.py on the full-size names: docs/models.md ("timm's own model tests")."""
import argparse
import warnings

import pytest
import timm
from timm.optim import create_optimizer_v2
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import itpn_ds.models  # noqa: F401  (registers the timm names)
from itpn_ds.engine.export import model_metadata, write_export
from itpn_ds.engine.optim import param_groups
from itpn_ds.models import CLASSIFIER_CONFIGS, create_model, list_models

HIVIT = dict(embed_dim=64, num_heads=2, mlp_depth1=1, mlp_depth2=1, depth=3)
FAST = dict(embed_dim=64, num_heads=2, depth_stage1=1, depth_stage2=1, depth=3)
TINY = {"itpn_base_3324_patch16_224": HIVIT, "fast_itpn_tiny_1112_patch16_224": FAST}


def tiny(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, img_size=64, num_classes=5, init_values=0.1, **TINY[name], **kwargs).eval()


def test_timm_lists_only_the_classifiers_and_ours_the_rest():
    assert timm.list_models("*tpn*") == sorted(CLASSIFIER_CONFIGS)
    assert {"clip_tpn_base_3324_patch16_224", "itpn_base_dec512d8b", "upernet_itpn_base_3324_patch16_512",
            "mask_rcnn_itpn_base_3324"} <= set(list_models())
    assert not timm.is_model("clip_tpn_base_3324_patch16_224")
    clip = create_model("clip_tpn_base_3324_patch16_224", img_size=64, teacher_dim=8, fpn_dim=16, **HIVIT)
    assert type(clip).__name__ == "ITPNClipDistill"
    # the CLIP pre-training's backbone through timm: the tag builds it with layer scale, as the checkpoint has
    features = timm.create_model("itpn_base_3324_patch16_224.clip_b16_in1k", features_only=True, img_size=64, **HIVIT)
    assert any(k.endswith("gamma_1") for k in features.state_dict())
    assert [o.shape[1] for o in features(torch.randn(1, 3, 96, 96))] == features.feature_info.channels()


@pytest.mark.parametrize("name, mean, crop_pct, size", [
    ("itpn_base_3324_patch16_224", timm.data.IMAGENET_INCEPTION_MEAN, 0.875, 224),
    ("itpn_base_3324_patch16_224.pixel_in1k", timm.data.IMAGENET_DEFAULT_MEAN, 0.875, 224),
    ("fast_itpn_base_3324_patch16_224.clip_l14_in1k_ft_in21k_in1k_512", timm.data.OPENAI_CLIP_MEAN, 1.0, 512)])
def test_pretrained_cfgs_give_the_published_evaluation_transform(name, mean, crop_pct, size):
    arch = name.split(".")[0]
    model = timm.create_model(name, **{**TINY.get(arch, FAST), "depth": 1})
    config = timm.data.resolve_data_config(model=model)
    assert config["mean"] == mean and config["crop_pct"] == crop_pct and config["interpolation"] == "bicubic"
    assert config["input_size"] == (3, size, size) and model.img_size == size  # fixed size: built at the cfg's
    resize, crop = timm.data.create_transform(**config).transforms[:2]
    assert resize.size == int(size / crop_pct) and crop.size == (size, size)
    assert model.pretrained_cfg["fixed_input_size"] and model.pretrained_cfg["first_conv"] == "patch_embed.proj"


@pytest.mark.parametrize("name", sorted(TINY))
def test_classifier_api(name):
    model, x = tiny(name), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 4, 4, 64) and model.output_fmt == "NHWC"
        pre = model.forward_head(features, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size) and model.get_classifier().out_features == 5
        final, levels = model.forward_intermediates(x, indices=2)
        assert torch.equal(final, features) and [m.shape for m in levels] == [(2, 64, 4, 4)] * 2
        assert len(model.feature_info) == 3
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(0, "")
        assert model(x).shape == (2, 4, 4, 64)
    assert timm.create_model(name, img_size=64, num_classes=0, global_pool="", **TINY[name])(x).shape == (2, 4, 4, 64)
    with pytest.raises(ValueError, match="global_pool must be"):
        model.reset_classifier(3, "max")


@pytest.mark.parametrize("name", sorted(TINY))
def test_torchscript_and_fx_give_the_eager_outputs(name):
    model, x = tiny(name), torch.randn(1, 3, 64, 64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), eager, atol=1e-6, rtol=1e-6)
        tracer = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                      param_shapes_constant=True)
        train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer)
        fx = create_feature_extractor(model, train_return_nodes=train_nodes[-1:], eval_return_nodes=eval_nodes[-1:],
                                      tracer_kwargs=tracer)
        assert torch.equal(next(iter(fx(x).values())), eager)


@pytest.mark.parametrize("name", sorted(TINY))
def test_dynamic_img_size_takes_other_sizes_and_the_fixed_model_says_its_own(name):
    fixed, dynamic = tiny(name), tiny(name, dynamic_img_size=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), fixed(x))
        assert dynamic.forward_features(torch.randn(1, 3, 96, 128)).shape == (1, 6, 8, 64)
    assert not dynamic._traits["fixed_input_size"] and fixed._traits["fixed_input_size"]
    with pytest.raises(ValueError, match="built for 64 px inputs"):
        fixed(torch.randn(1, 3, 96, 96))


@pytest.mark.parametrize("name, decay", [("itpn_base_3324_patch16_224", 0.6), ("fast_itpn_tiny_1112_patch16_224", 0.8)])
def test_timm_optimizer_with_layer_decay_gives_the_engine_rates(name, decay):
    model = tiny(name)
    ours = {id(p): (g["lr_scale"], g["wd_scale"] > 0) for g in param_groups(model, decay) for p in g["params"]}
    optimizer = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=decay)
    theirs = {id(p): (g["lr_scale"], g["weight_decay"] > 0) for g in optimizer.param_groups for p in g["params"]}
    assert theirs.keys() == ours.keys()
    for key, (scale, decays) in ours.items():
        assert theirs[key][0] == pytest.approx(scale) and theirs[key][1] == decays
    assert len({scale for scale, _ in ours.values()}) == model.num_lr_layers


def test_pretrained_file_and_local_dir_export_load_through_our_rule(tmp_path):
    name = "itpn_base_3324_patch16_224"
    trained = tiny(name)
    x = torch.randn(1, 3, 64, 64)
    published = tmp_path / "published.pth"  # wrapped as the published files: {'model', 'args'}, DDP prefix
    torch.save({"model": {f"module.{k}": v for k, v in trained.state_dict().items()},
                "args": argparse.Namespace(lr=1e-3)}, published)
    kwargs = dict(img_size=64, num_classes=5, init_values=0.1, **HIVIT)
    from_file = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(published)), **kwargs)
    out = write_export(trained.state_dict(), model_metadata(name, kwargs, "finetune", None, 3, tmp_path,
                                                            classes={f"c{i}": i for i in range(5)}), tmp_path / "ex")
    exported = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert exported.num_classes == 5 and exported.img_size == 64
    assert exported.pretrained_cfg["label_names"] == [f"c{i}" for i in range(5)]
    assert exported.pretrained_cfg["input_size"] == (3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(from_file.eval()(x), trained(x), atol=0, rtol=0)
        torch.testing.assert_close(exported(x), trained(x), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="No pretrained weights"):  # nothing to download
        timm.create_model(name, pretrained=True, **kwargs)


def test_task_and_pixel_models_state_their_sizes():
    detection = create_model("mask_rcnn_itpn_base_3324", features_only=True, **HIVIT)
    size = detection.pretrained_cfg["input_size"]
    assert size == (3, 256, 256)  # built at 224: the smallest multiple of the coarsest stride (64) above
    assert len(detection(torch.randn(1, *size))) == 5
    pixel = create_model("itpn_base_dec512d8b", img_size=64, embed_dim=64, num_heads=2, mlp_depth=1, depth=2,
                         decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    with pytest.raises(ValueError, match="built for 64 px inputs"):
        pixel(torch.randn(1, 3, 96, 96))
