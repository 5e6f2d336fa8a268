"""timm registrations: ``timm.create_model(NAME)`` after ``import itpn_ds``.

``pretrained=True`` never downloads: pass ``pretrained_cfg_overlay=dict(file=PATH)`` with an official ``.pth``
checkpoint or one of our ``.safetensors`` exports; it goes through ``load_weights`` (the loading
rule of ``itpn_ds.models.loading``) and the ``LoadReport`` is logged.

``features_only=True`` (timm's feature API) on any name builds the dense backbone of the name's family
(``DenseITPN`` / ``DenseFastITPN``, ``itpn_ds.models.dense``) with the name's configuration, ``layout``
(``segmentation``, the default, or ``detection``) and ``out_indices`` (default: every level), loads
``pretrained`` weights into it and returns it wrapped in timm's ``FeatureGetterNet`` (``feature_info``: channels
and reduction of the selected levels). On a dense task name (``DENSE_MODEL_CONFIGS``: ``upernet_*``,
``mask_rcnn_*``) it builds that task's backbone and ignores the task heads' arguments, so an export's
``config.json`` kwargs rebuild the backbone of its weights.
"""
from __future__ import annotations

import inspect
import logging
from typing import Callable

from timm.models import register_model
from timm.models._features import FeatureGetterNet
from torch import nn

from itpn_ds.models.clip_distill import ITPNClipDistill
from itpn_ds.models.dense import DenseFastITPN, DenseITPN
from itpn_ds.models.detection import mask_rcnn
from itpn_ds.models.fast_clip_distill import FastITPNClipDistill
from itpn_ds.models.fast_itpn import FastITPN
from itpn_ds.models.itpn import ITPN
from itpn_ds.models.loading import load_target, load_weights, read_checkpoint_file
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

# name -> (class, published keyword arguments)
MODEL_CONFIGS: dict[str, tuple[type[nn.Module], dict]] = {
    "itpn_base_3324_patch16_224": (ITPN, dict(**BASE, mlp_depth1=3, mlp_depth2=3, depth=24)),
    "itpn_large_2240_patch16_224": (ITPN, dict(**LARGE, mlp_depth1=2, mlp_depth2=2, depth=40)),
    "clip_tpn_base_3324_patch16_224": (ITPNClipDistill, dict(**BASE, **PYRAMID, mlp_depth1=3, mlp_depth2=3, depth=24)),
    "clip_tpn_large_2240_patch16_224": (ITPNClipDistill, dict(**LARGE, **PYRAMID, mlp_depth1=2, mlp_depth2=2, depth=40)),
    "clip_tpn_large_2240_patch16_256": (ITPNClipDistill, dict(**LARGE, **PYRAMID, mlp_depth1=2, mlp_depth2=2, depth=40,
                                                              img_size=256)),
    "itpn_base_dec512d8b": (ITPNPixelMAE, dict(**BASE, num_outs=3, mlp_depth=3, depth=24, decoder_embed_dim=512,
                                               decoder_depth=8, decoder_num_heads=16)),
    "itpn_large_dec512d8b": (ITPNPixelMAE, dict(**LARGE, num_outs=3, mlp_depth=2, depth=40, decoder_embed_dim=512,
                                                decoder_depth=8, decoder_num_heads=16)),
    "fast_itpn_tiny_1112_patch16_224": (FastITPN, FAST_TINY),
    "fast_itpn_small_2220_patch16_224": (FastITPN, FAST_SMALL),
    "fast_itpn_base_3324_patch16_224": (FastITPN, FAST_BASE),
    # As published, this entry builds a 224 px position embedding (fine-tuning passes img_size=256).
    "fast_itpn_large_2240_patch16_256": (FastITPN, FAST_LARGE),
    # Ours (no published Fast-iTPN pre-training code): CLIP-L distillation on the Fast-iTPN backbones. L
    # pre-trains at 256 px (16 x 16 tokens = CLIP-L/14 at 224 px); T/S/B at 224 px against CLIP-L/14 at 196 px.
    "fast_clip_tpn_tiny_1112_patch16_224": (FastITPNClipDistill, dict(**FAST_TINY, **PYRAMID)),
    "fast_clip_tpn_small_2220_patch16_224": (FastITPNClipDistill, dict(**FAST_SMALL, **PYRAMID)),
    "fast_clip_tpn_base_3324_patch16_224": (FastITPNClipDistill, dict(**FAST_BASE, **PYRAMID)),
    "fast_clip_tpn_large_2240_patch16_256": (FastITPNClipDistill, dict(**FAST_LARGE, **PYRAMID, img_size=256)),
}


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
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown iTPN model {name!r}; known: {', '.join([*MODEL_CONFIGS, *DENSE_MODEL_CONFIGS])}")
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


def build_dense_backbone(name: str, **overrides) -> nn.Module:
    """The dense backbone (``layout`` ``segmentation`` by default) of ``name``'s family and configuration,
    updated by ``overrides``; for a dense task name, that task's backbone (its head arguments ignored)."""
    if name in DENSE_MODEL_CONFIGS:
        builder, backbone_name, backbone_kwargs, _ = DENSE_MODEL_CONFIGS[name]
        backbone_overrides, _ = split_task_kwargs(builder, overrides)
        return build_dense_backbone(backbone_name, **{**backbone_kwargs, **backbone_overrides})
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown iTPN model {name!r}; known: {', '.join([*MODEL_CONFIGS, *DENSE_MODEL_CONFIGS])}")
    cls, kwargs = MODEL_CONFIGS[name]
    dense_cls, family_defaults = DENSE_FAMILIES[cls]
    kwargs = {k: v for k, v in {**family_defaults, **kwargs}.items() if k not in HEAD_ONLY_KWARGS + LAYOUT_KWARGS}
    kwargs = {**kwargs, **overrides}
    if "mlp_depth" in kwargs:  # the pixel model's one depth for both early stages, unless given apart
        depth = kwargs.pop("mlp_depth")
        kwargs = {"mlp_depth1": depth, "mlp_depth2": depth, **kwargs}
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


def load_file_into(model: nn.Module, name: str, pretrained_cfg_overlay: dict | None) -> None:
    """``pretrained=True``: the overlay's local ``file`` through ``load_weights``; a task model takes a task
    checkpoint of its own kind whole and anything else (pre-training, classifier, another task) into its
    backbone."""
    file = (pretrained_cfg_overlay or {}).get("file")
    if not file:
        raise ValueError(f"{name}: pretrained=True needs a local file: "
                         "timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))")
    state = read_checkpoint_file(file)
    report = load_weights(load_target(model, state), state)
    log.info("%s from %s: %s", name, file, report.summary())


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    def create(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay: dict | None = None,
               cache_dir=None, features_only: bool = False, out_indices: int | tuple[int, ...] | None = None,
               **kwargs):  # pretrained_cfg and cache_dir: passed by timm, unused (no downloads)
        model = build_dense_backbone(name, **kwargs) if features_only else build_model(name, **kwargs)
        img_size = getattr(model, "img_size", None) or model.dense_backbone.img_size
        model.pretrained_cfg = {"architecture": name, "input_size": (3, img_size, img_size),
                                "interpolation": "bicubic", **(pretrained_cfg_overlay or {})}
        if pretrained:
            load_file_into(model, name, pretrained_cfg_overlay)
        if not features_only:
            return model
        levels = out_indices if out_indices is not None else tuple(range(len(model.feature_info)))
        features = FeatureGetterNet(model, out_indices=levels, prune=False)
        features.pretrained_cfg = model.pretrained_cfg
        return features

    create.__name__ = name
    create.__doc__ = (f"{DENSE_MODEL_CONFIGS[name][0].__name__} with the published {name} configuration."
                      if name in DENSE_MODEL_CONFIGS else
                      f"{MODEL_CONFIGS[name][0].__name__} with the published {name} configuration.")
    return create


for _name in (*MODEL_CONFIGS, *DENSE_MODEL_CONFIGS):
    register_model(_entrypoint(_name))
