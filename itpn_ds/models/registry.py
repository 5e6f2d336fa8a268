"""Model registries: timm's for the classifiers, ours for the pre-training and dense task models.

timm (``timm.create_model(NAME)`` after ``import itpn_ds.models``): the classifiers ``itpn_*_patch16_*`` and
``fast_itpn_*`` (``CLASSIFIER_CONFIGS``), built by timm's ``build_model_with_cfg`` with a pretrained cfg per
published checkpoint (``default_cfgs``: input size, mean / std, crop_pct, interpolation of the published
evaluation, tags such as ``.clip_b16_in1k``), so ``timm.list_models()`` lists only what timm's tools run and
``timm.data.resolve_data_config(model=m)`` + ``create_transform`` give the published evaluation transform.
``pretrained=True`` never downloads: ``pretrained_cfg_overlay=dict(file=PATH)`` (an official ``.pth`` or our
``.safetensors``; timm's ``custom_load`` hook, ``TimmClassifier.load_pretrained``) and ``local-dir:EXPORT``
(``checkpoint_filter_fn``) both go through ``load_weights`` / ``fit_state_dict``, the rule of
``itpn_ds.models.loading``.

``features_only=True`` (timm's feature API) on a classifier name builds the dense backbone of its family
(``DenseITPN`` / ``DenseFastITPN``, ``itpn_ds.models.dense``) with the name's configuration, ``layout``
(``segmentation``, the default, or ``detection``) and ``out_indices`` (default: every level), in timm's
``FeatureGetterNet`` (``feature_info``: channels and reduction of the selected levels).

Ours (``create_model`` / ``list_models`` here; ``PRETRAIN_CONFIGS``, ``DENSE_MODEL_CONFIGS``): the CLIP and
pixel pre-training models (``forward`` takes a mask, or returns a loss) and the dense task models
(``upernet_*``, ``mask_rcnn_*``), which timm's classification tools cannot run. ``create_model`` takes
every name (timm's included) with timm's keywords: ``features_only=True`` builds the backbone of a
pre-training or task name the same way (for a task name, its backbone: the heads' arguments are ignored, so
an export's ``config.json`` kwargs rebuild the backbone of its weights); ``pretrained=True`` with
``pretrained_cfg_overlay=dict(file=PATH)`` loads by the same rule (a task model takes a checkpoint of its own
kind whole and anything else into its backbone).
"""
from __future__ import annotations

import inspect
import logging
from typing import Callable, Mapping

import torch
from timm.data import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD,
                       OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import FeatureGetterNet
from timm.models._pretrained import PretrainedCfg
from timm.models._registry import get_pretrained_cfg
from torch import nn

from itpn_ds.models.clip_distill import ITPNClipDistill
from itpn_ds.models.dense import LAYOUTS, DenseFastITPN, DenseITPN
from itpn_ds.models.detection import mask_rcnn
from itpn_ds.models.fast_clip_distill import FastITPNClipDistill
from itpn_ds.models.fast_itpn import FastITPN
from itpn_ds.models.itpn import ITPN
from itpn_ds.models.layers import square_size
from itpn_ds.models.loading import fit_state_dict, load_target, load_weights, read_checkpoint_file
from itpn_ds.models.pixel_mae import ITPNPixelMAE
from itpn_ds.models.segmentation import upernet

log = logging.getLogger(__name__)

BASE = dict(embed_dim=512, num_heads=8)
LARGE = dict(embed_dim=768, num_heads=12)
PYRAMID = dict(num_outs=3, fpn_dim=256, fpn_depth=1)
FAST_TINY = dict(embed_dim=384, num_heads=6, depth_stage1=1, depth_stage2=1, depth=12)
FAST_SMALL = dict(embed_dim=384, num_heads=6, depth_stage1=2, depth_stage2=2, depth=20)
FAST_BASE = dict(**BASE, depth_stage1=3, depth_stage2=3, depth=24)
FAST_LARGE = dict(**LARGE, depth_stage1=2, depth_stage2=2, depth=40)

# timm classifier name -> (class, published keyword arguments)
CLASSIFIER_CONFIGS: dict[str, tuple[type[nn.Module], dict]] = {
    "itpn_base_3324_patch16_224": (ITPN, dict(**BASE, mlp_depth1=3, mlp_depth2=3, depth=24)),
    "itpn_large_2240_patch16_224": (ITPN, dict(**LARGE, mlp_depth1=2, mlp_depth2=2, depth=40)),
    "fast_itpn_tiny_1112_patch16_224": (FastITPN, FAST_TINY),
    "fast_itpn_small_2220_patch16_224": (FastITPN, FAST_SMALL),
    "fast_itpn_base_3324_patch16_224": (FastITPN, FAST_BASE),
    "fast_itpn_large_2240_patch16_256": (FastITPN, FAST_LARGE),
}
# our pre-training name -> (class, published keyword arguments)
PRETRAIN_CONFIGS: dict[str, tuple[type[nn.Module], dict]] = {
    "clip_tpn_base_3324_patch16_224": (ITPNClipDistill, dict(**BASE, **PYRAMID, mlp_depth1=3, mlp_depth2=3, depth=24)),
    "clip_tpn_large_2240_patch16_224": (ITPNClipDistill, dict(**LARGE, **PYRAMID, mlp_depth1=2, mlp_depth2=2, depth=40)),
    "clip_tpn_large_2240_patch16_256": (ITPNClipDistill, dict(**LARGE, **PYRAMID, mlp_depth1=2, mlp_depth2=2, depth=40,
                                                              img_size=256)),
    "itpn_base_dec512d8b": (ITPNPixelMAE, dict(**BASE, num_outs=3, mlp_depth=3, depth=24, decoder_embed_dim=512,
                                               decoder_depth=8, decoder_num_heads=16)),
    "itpn_large_dec512d8b": (ITPNPixelMAE, dict(**LARGE, num_outs=3, mlp_depth=2, depth=40, decoder_embed_dim=512,
                                                decoder_depth=8, decoder_num_heads=16)),
    # Ours (no published Fast-iTPN pre-training code): CLIP-L distillation on the Fast-iTPN backbones. L
    # pre-trains at 256 px (16 x 16 tokens = CLIP-L/14 at 224 px); T/S/B at 224 px against CLIP-L/14 at 196 px.
    "fast_clip_tpn_tiny_1112_patch16_224": (FastITPNClipDistill, dict(**FAST_TINY, **PYRAMID)),
    "fast_clip_tpn_small_2220_patch16_224": (FastITPNClipDistill, dict(**FAST_SMALL, **PYRAMID)),
    "fast_clip_tpn_base_3324_patch16_224": (FastITPNClipDistill, dict(**FAST_BASE, **PYRAMID)),
    "fast_clip_tpn_large_2240_patch16_256": (FastITPNClipDistill, dict(**FAST_LARGE, **PYRAMID, img_size=256)),
}
MODEL_CONFIGS: dict[str, tuple[type[nn.Module], dict]] = {**CLASSIFIER_CONFIGS, **PRETRAIN_CONFIGS}


def eval_cfg(size: int = 224, mean: tuple = IMAGENET_INCEPTION_MEAN, std: tuple = IMAGENET_INCEPTION_STD,
             num_classes: int = 1000, **kwargs) -> dict:
    """A pretrained cfg: the published evaluation at ``size`` px (bicubic; crop_pct 224/256 below 384 px, 1.0
    from 384 up, REFERENCE.md) with the normalisation of the published script, a fixed input size (build with
    ``dynamic_img_size=True`` for any size), timm's layer names, and the custom loader (no downloads)."""
    return dict(num_classes=num_classes, input_size=(3, size, size), pool_size=(size // 16, size // 16),
                crop_pct=224 / 256 if size < 384 else 1.0, interpolation="bicubic", mean=mean, std=std,
                fixed_input_size=True, first_conv="patch_embed.proj", classifier="head", custom_load=True,
                license="mit", paper_ids="arXiv:2211.12735", **kwargs)


PUBLISHED = "published checkpoint (sunsmarterjie/iTPN README, not downloadable by timm): pass " \
            "pretrained_cfg_overlay=dict(file=PATH)"
# Normalisation of the published scripts: iTPN fine-tuning (itpn_clip/datasets.py) Inception mean / std, the
# pixel fine-tuning (itpn_pixel/util/datasets.py) ImageNet's, Fast-iTPN (fast_itpn/datasets.py) OpenAI CLIP's.
CLIP = dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
PIXEL = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
default_cfgs = generate_default_cfgs({
    # untagged: our fine-tuning recipes, evaluated as the published fine-tuning evaluates
    "itpn_base_3324_patch16_224": eval_cfg(),
    "itpn_base_3324_patch16_224.clip_b16_in1k": eval_cfg(num_classes=0, notes=("CLIP-B/16 pre-training", PUBLISHED)),
    "itpn_base_3324_patch16_224.pixel_in1k": eval_cfg(num_classes=0, **PIXEL, notes=("pixel pre-training", PUBLISHED)),
    "itpn_large_2240_patch16_224": eval_cfg(),
    "itpn_large_2240_patch16_224.clip_l14_in1k": eval_cfg(num_classes=0, notes=("CLIP-L/14 pre-training", PUBLISHED)),
    "itpn_large_2240_patch16_224.pixel_in1k": eval_cfg(num_classes=0, **PIXEL, notes=("pixel pre-training", PUBLISHED)),
    "fast_itpn_tiny_1112_patch16_224.clip_l14_in1k_ft_in1k": eval_cfg(**CLIP, notes=("85.1 top-1", PUBLISHED)),
    "fast_itpn_small_2220_patch16_224.clip_l14_in1k_ft_in1k": eval_cfg(**CLIP, notes=("86.4 top-1", PUBLISHED)),
    "fast_itpn_base_3324_patch16_224.clip_l14_in1k_ft_in1k": eval_cfg(**CLIP, notes=("87.4 top-1", PUBLISHED)),
    "fast_itpn_base_3324_patch16_224.clip_l14_in1k_ft_in21k_in1k_512": eval_cfg(
        512, **CLIP, notes=("88.75 top-1 at 512 px", PUBLISHED)),
    # untagged: the name's 256 px; the published fine-tuning is at 640 px
    "fast_itpn_large_2240_patch16_256": eval_cfg(256, **CLIP),
    "fast_itpn_large_2240_patch16_256.clip_l14_in1k_ft_in1k_640": eval_cfg(640, **CLIP, notes=("89.5 top-1 at 640 px",
                                                                                                PUBLISHED)),
})
# Architecture of a tag's checkpoint beyond its name's: the CLIP pre-trainings train layer scale (gammas), and
# the published fine-tuning from them builds the classifier with it (REFERENCE.md).
TAG_MODEL_ARGS: dict[str, dict] = {"clip_b16_in1k": dict(init_values=0.1), "clip_l14_in1k": dict(init_values=0.1)}


# The dense backbone of each family: (class, arguments the pre-training class sets by default and the dense
# backbone must share to take its weights). Arguments of the heads are left out (``HEAD_ONLY_KWARGS``).
DENSE_FAMILIES: dict[type[nn.Module], tuple[type[nn.Module], dict]] = {
    ITPN: (DenseITPN, {}),
    ITPNClipDistill: (DenseITPN, dict(init_values=0.1)),
    ITPNPixelMAE: (DenseITPN, dict(rpe=False)),
    FastITPN: (DenseFastITPN, {}),
    FastITPNClipDistill: (DenseFastITPN, {}),
}
HEAD_ONLY_KWARGS = ("num_classes", "num_outs", "teacher_dim", "decoder_embed_dim", "decoder_depth",
                    "decoder_num_heads", "norm_pix_loss", "convmlp", "subln", "init_scale")
# The layout sets the pyramid depth (published: segmentation 2, detection 1), not the pre-training name.
LAYOUT_KWARGS = ("fpn_depth",)

# dense task name -> (builder of the task model on a backbone, backbone name, backbone arguments, head arguments)
DENSE_MODEL_CONFIGS: dict[str, tuple[Callable[..., nn.Module], str, dict, dict]] = {
    # ADE20K UperNet (seg/configs/itpn/clip_upernet_itpn_*_512_slide_160k_ade20k_pt2ft.py)
    "upernet_itpn_base_3324_patch16_512": (upernet, "clip_tpn_base_3324_patch16_224",
                                           dict(layout="segmentation", img_size=512, drop_path_rate=0.2),
                                           dict(num_classes=150, channels=768)),
    "upernet_itpn_large_2240_patch16_512": (upernet, "clip_tpn_large_2240_patch16_224",
                                            dict(layout="segmentation", img_size=512, drop_path_rate=0.2),
                                            dict(num_classes=150, channels=768)),
    # COCO Mask R-CNN (det/configs/itpn/clip_itpn_base_3x_ld090_dp030.py, clip_itpn_large_1x_ld095_dp020.py)
    "mask_rcnn_itpn_base_3324": (mask_rcnn, "clip_tpn_base_3324_patch16_224",
                                 dict(layout="detection", drop_path_rate=0.3), dict(num_classes=81)),
    "mask_rcnn_itpn_large_2240": (mask_rcnn, "clip_tpn_large_2240_patch16_224",
                                  dict(layout="detection", drop_path_rate=0.2), dict(num_classes=81)),
    # COCO Cascade Mask R-CNN (det/configs/itpn/cascade_{CLIP,pixel}_itpn_base_3x.py; what they build: docs/dense.md)
    "cascade_mask_rcnn_itpn_base_3324": (mask_rcnn, "clip_tpn_base_3324_patch16_224",
                                         dict(layout="detection", drop_path_rate=0.2),
                                         dict(num_classes=81, roi_head="cascade", class_agnostic=True)),
    # The same heads on pixel pre-training (det/configs/itpn/pixel_itpn_base_*, seg/configs/itpn/pixel_upernet_*):
    # no layer scale; the detection backbones without relative positions (rpe=False, the family default), the
    # segmentation ones with them (rpe=True, the tables start at zero: the pixel pre-training has none).
    "mask_rcnn_itpn_pixel_base_3324": (mask_rcnn, "itpn_base_dec512d8b",
                                       dict(layout="detection", drop_path_rate=0.3), dict(num_classes=81)),
    "mask_rcnn_itpn_pixel_large_2240": (mask_rcnn, "itpn_large_dec512d8b",
                                        dict(layout="detection", drop_path_rate=0.2), dict(num_classes=81)),
    "cascade_mask_rcnn_itpn_pixel_base_3324": (mask_rcnn, "itpn_base_dec512d8b",
                                               dict(layout="detection", drop_path_rate=0.2),
                                               dict(num_classes=81, roi_head="cascade", class_agnostic=True)),
    "upernet_itpn_pixel_base_3324_patch16_512": (upernet, "itpn_base_dec512d8b",
                                                 dict(layout="segmentation", img_size=512, drop_path_rate=0.1, rpe=True),
                                                 dict(num_classes=150, channels=768)),
    "upernet_itpn_pixel_large_2240_patch16_512": (upernet, "itpn_large_dec512d8b",
                                                  dict(layout="segmentation", img_size=512, drop_path_rate=0.2,
                                                       rpe=True),
                                                  dict(num_classes=150, channels=768)),
    # Ours (no published Fast-iTPN dense code): the same heads on Fast-iTPN CLIP pre-training.
    "upernet_fast_itpn_base_3324_patch16_512": (upernet, "fast_clip_tpn_base_3324_patch16_224",
                                                dict(layout="segmentation", img_size=512, drop_path_rate=0.2),
                                                dict(num_classes=150, channels=768)),
    "mask_rcnn_fast_itpn_base_3324": (mask_rcnn, "fast_clip_tpn_base_3324_patch16_224",
                                      dict(layout="detection", drop_path_rate=0.3), dict(num_classes=81)),
}


def build_model(name: str, **overrides) -> nn.Module:
    """Our class for ``name`` with the published arguments, updated by ``overrides``; a dense task name builds
    its task model (``build_dense_model``)."""
    if name in DENSE_MODEL_CONFIGS:
        return build_dense_model(name, **overrides)
    check_known(name)
    cls, kwargs = MODEL_CONFIGS[name]
    model = cls(**{**kwargs, **overrides})
    model.model_name = name
    model.model_kwargs = dict(overrides)
    return model


def constructor_keywords(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` accepts: its ``__init__`` parameters and, where it forwards
    ``**kwargs``, those of the base classes it forwards them to."""
    keywords: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is nn.Module:
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        keywords |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return keywords


def dense_backbone_kwargs(name: str, overrides: Mapping) -> tuple[type[nn.Module], dict]:
    """(dense backbone class, its keyword arguments) of a classifier or pre-training name's family and
    configuration, updated by ``overrides`` (see ``build_dense_backbone``)."""
    cls, kwargs = MODEL_CONFIGS[name]
    dense_cls, family_defaults = DENSE_FAMILIES[cls]
    kwargs = {k: v for k, v in {**family_defaults, **kwargs}.items() if k not in HEAD_ONLY_KWARGS + LAYOUT_KWARGS}
    kwargs = {**kwargs, **overrides}
    if "mlp_depth" in kwargs:  # the pixel model's one depth for both early stages, unless given apart
        depth = kwargs.pop("mlp_depth")
        kwargs = {"mlp_depth1": depth, "mlp_depth2": depth, **kwargs}
    return dense_cls, kwargs


def build_dense_backbone(name: str, **overrides) -> nn.Module:
    """The dense backbone (``layout`` ``segmentation`` by default) of ``name``'s family and configuration,
    updated by ``overrides``; for a dense task name, that task's backbone (its head arguments ignored)."""
    if name in DENSE_MODEL_CONFIGS:
        builder, backbone_name, backbone_kwargs, _ = DENSE_MODEL_CONFIGS[name]
        backbone_overrides, _ = split_task_kwargs(builder, overrides)
        return build_dense_backbone(backbone_name, **{**backbone_kwargs, **backbone_overrides})
    check_known(name)
    dense_cls, kwargs = dense_backbone_kwargs(name, overrides)
    model = dense_cls(**kwargs)
    model.model_name = name
    model.model_kwargs = dict(overrides)
    return model


def split_task_kwargs(builder: Callable[..., nn.Module], kwargs: dict) -> tuple[dict, dict]:
    """(backbone arguments, head arguments): the head's are the builder's parameters besides ``backbone``."""
    heads = set(inspect.signature(builder).parameters) - {"backbone"}
    return ({k: v for k, v in kwargs.items() if k not in heads}, {k: v for k, v in kwargs.items() if k in heads})


def build_dense_model(name: str, **overrides) -> nn.Module:
    """The task model of a dense task name: its builder on ``build_dense_backbone``; ``overrides`` go to the
    heads (the builder's parameters) or to the backbone (everything else)."""
    builder, backbone_name, backbone_kwargs, head_kwargs = DENSE_MODEL_CONFIGS[name]
    backbone_overrides, head_overrides = split_task_kwargs(builder, overrides)
    backbone = build_dense_backbone(backbone_name, **{**backbone_kwargs, **backbone_overrides})
    model = builder(backbone, **{**head_kwargs, **head_overrides})
    model.model_name = name
    model.model_kwargs = dict(overrides)
    return model


def check_known(name: str) -> None:
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown iTPN model {name!r}; known: {', '.join([*MODEL_CONFIGS, *DENSE_MODEL_CONFIGS])}")


# ---- timm's registry: the classifiers ----------------------------------------------------------------------
def checkpoint_filter_fn(state_dict: Mapping, model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: a checkpoint (a ``local-dir`` export, a state dict) by our loading
    rule into a state dict with every key of ``model`` (``fit_state_dict``); the report is logged."""
    full, report = fit_state_dict(model, state_dict)
    log.info("%s: %s", type(model).__name__, report.summary())
    return full


def resolved_tag(name: str, pretrained_cfg: str | dict | PretrainedCfg | None) -> str:
    """The pretrained tag timm resolves for ``name`` (a ``name.tag`` passes its tag as ``pretrained_cfg``)."""
    if isinstance(pretrained_cfg, str):
        return pretrained_cfg
    if isinstance(pretrained_cfg, dict):
        return pretrained_cfg.get("tag") or ""
    if isinstance(pretrained_cfg, PretrainedCfg):
        return pretrained_cfg.tag or ""
    return get_pretrained_cfg(name).tag or ""


def create_classifier(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's builder for a classifier name: the published arguments, those of the tag's checkpoint
    (``TAG_MODEL_ARGS``), ``kwargs``; with ``features_only`` the family's dense backbone in ``FeatureGetterNet``
    (every level unless ``out_indices``), whose input is any multiple of its coarsest stride."""
    cls, arch = CLASSIFIER_CONFIGS[name]
    kwargs = {**arch, **TAG_MODEL_ARGS.get(resolved_tag(name, kwargs.get("pretrained_cfg")), {}), **kwargs}
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if overlay.get("file"):  # timm resets custom_load for a file overlay: keep it, the file goes through our rule
        kwargs["pretrained_cfg_overlay"] = {"custom_load": True, **overlay}
    if not kwargs.get("features_only"):
        return build_model_with_cfg(cls, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)
    keep = ("features_only", "out_indices", "feature_cls", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
    dense_cls, dense = dense_backbone_kwargs(name, {k: v for k, v in kwargs.items() if k not in keep})
    dense = {**dense, **{k: v for k, v in kwargs.items() if k in keep}}
    levels = tuple(range(len(LAYOUTS[dense.get("layout", "segmentation")].strides)))
    model = build_model_with_cfg(dense_cls, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                 feature_cfg=dict(feature_cls="getter", prune=False, out_indices=levels),
                                 kwargs_filter=("num_classes", "global_pool"), **dense)
    model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, "fixed_input_size": False}
    return model


def local_dir_config(name: str, model_args: Mapping, label_names: list[str] | None = None) -> dict:
    """The keys timm's ``local-dir:`` reads from an export's ``config.json`` (``timm.models._hub``):
    ``architecture``, ``num_classes``, ``model_args`` (what ``timm.create_model`` passes the builder) and
    ``pretrained_cfg`` (the name's default cfg at the exported size and classes: the published evaluation, the
    class names as ``label_names``). Empty for a name outside timm's registry (pre-training, task models)."""
    if name not in CLASSIFIER_CONFIGS:
        return {}
    cfg = get_pretrained_cfg(name).to_dict()
    size = square_size(model_args.get("img_size", cfg["input_size"][-1]))
    default = inspect.signature(CLASSIFIER_CONFIGS[name][0]).parameters["num_classes"].default
    num_classes = model_args.get("num_classes", default)
    cfg.update(eval_cfg(size, mean=cfg["mean"], std=cfg["std"], num_classes=num_classes), tag="", notes=None)
    if label_names:
        cfg["label_names"] = list(label_names)
    return {"architecture": name, "num_classes": num_classes, "model_args": dict(model_args),
            "pretrained_cfg": {k: v for k, v in cfg.items() if v is not None}}


def timm_entrypoint(name: str) -> Callable[..., nn.Module]:
    def create(pretrained: bool = False, **kwargs) -> nn.Module:
        return create_classifier(name, pretrained, **kwargs)

    create.__name__ = name
    create.__doc__ = f"{CLASSIFIER_CONFIGS[name][0].__name__} with the published {name} configuration."
    return create


for _name in CLASSIFIER_CONFIGS:
    register_model(timm_entrypoint(_name))


# ---- our registry: pre-training and dense task models ------------------------------------------------------
def list_models() -> list[str]:
    """Our names: the pre-training and dense task models (the classifiers are timm's: ``timm.list_models``)."""
    return sorted([*PRETRAIN_CONFIGS, *DENSE_MODEL_CONFIGS])


def load_file_into(model: nn.Module, name: str, pretrained_cfg_overlay: dict | None) -> None:
    """``pretrained=True``: the overlay's local ``file`` through ``load_weights``; a task model takes a task
    checkpoint of its own kind whole and anything else (pre-training, classifier, another task) into its
    backbone."""
    file = (pretrained_cfg_overlay or {}).get("file")
    if not file:
        raise ValueError(f"{name}: pretrained=True needs a local file: "
                         "create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))")
    state = read_checkpoint_file(file)
    report = load_weights(load_target(model, state), state)
    log.info("%s from %s: %s", name, file, report.summary())


def create_model(name: str, pretrained: bool = False, pretrained_cfg_overlay: dict | None = None,
                 features_only: bool = False, out_indices: int | tuple[int, ...] | None = None,
                 **kwargs) -> nn.Module:
    """Any name, with timm's keywords: a timm name (the classifiers, ``local-dir:``) through
    ``timm.create_model``; ours (``list_models()``) as the module docstring says."""
    if name not in PRETRAIN_CONFIGS and name not in DENSE_MODEL_CONFIGS:
        import timm

        extra = {} if out_indices is None else dict(out_indices=out_indices)
        return timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=pretrained_cfg_overlay,
                                 features_only=features_only, **extra, **kwargs)
    model = build_dense_backbone(name, **kwargs) if features_only else build_model(name, **kwargs)
    if pretrained:
        load_file_into(model, name, pretrained_cfg_overlay)
    model.pretrained_cfg = model.default_cfg = input_cfg(name, model)
    if not features_only:
        return model
    levels = out_indices if out_indices is not None else tuple(range(len(model.feature_info)))
    features = FeatureGetterNet(model, out_indices=levels, prune=False)
    features.pretrained_cfg = features.default_cfg = model.pretrained_cfg
    return features


def input_cfg(name: str, model: nn.Module) -> dict:
    """Our models' ``pretrained_cfg``: the input they take (a dense backbone: its size rounded up to its
    coarsest stride, e.g. 256 px for a detection backbone built at 224, and any other multiple)."""
    backbone = getattr(model, "dense_backbone", model)
    stride = getattr(backbone, "coarsest_stride", None)
    size = backbone.img_size if stride is None else -(-backbone.img_size // stride) * stride
    return {"architecture": name, "input_size": (3, size, size), "interpolation": "bicubic",
            "fixed_input_size": stride is None, **({} if stride is None else {"min_input_size": (3, stride, stride)})}


def is_model(name: str) -> bool:
    """A name ``create_model`` builds: ours or timm's."""
    import timm

    return name in PRETRAIN_CONFIGS or name in DENSE_MODEL_CONFIGS or timm.is_model(name)
