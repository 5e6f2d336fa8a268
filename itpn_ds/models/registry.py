"""timm registrations: ``timm.create_model(NAME)`` after ``import itpn_ds``.

``pretrained=True`` never downloads: pass ``pretrained_cfg_overlay=dict(file=PATH)`` with an official ``.pth``
checkpoint or one of our ``.safetensors`` exports; it goes through ``load_weights`` (the loading
rule of ``itpn_ds.models.loading``) and the ``LoadReport`` is logged.
"""
from __future__ import annotations

import inspect
import logging
from typing import Callable

from timm.models import register_model
from torch import nn

from itpn_ds.models.clip_distill import ITPNClipDistill
from itpn_ds.models.fast_clip_distill import FastITPNClipDistill
from itpn_ds.models.fast_itpn import FastITPN
from itpn_ds.models.itpn import ITPN
from itpn_ds.models.loading import load_weights, read_checkpoint_file
from itpn_ds.models.pixel_mae import ITPNPixelMAE

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


def build_model(name: str, **overrides) -> nn.Module:
    """Our class for ``name`` with the published arguments, updated by ``overrides``."""
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown iTPN model {name!r}; known: {', '.join(MODEL_CONFIGS)}")
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


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    def create(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay: dict | None = None,
               cache_dir=None, **kwargs):  # pretrained_cfg and cache_dir: passed by timm, unused (no downloads)
        model = build_model(name, **kwargs)
        model.pretrained_cfg = {"architecture": name, "input_size": (3, model.img_size, model.img_size),
                                "interpolation": "bicubic", **(pretrained_cfg_overlay or {})}
        if pretrained:
            file = (pretrained_cfg_overlay or {}).get("file")
            if not file:
                raise ValueError(f"{name}: pretrained=True needs a local file: "
                                 "timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))")
            report = load_weights(model, read_checkpoint_file(file))
            log.info("%s from %s: %s", name, file, report.summary())
        return model

    create.__name__ = name
    create.__doc__ = f"{MODEL_CONFIGS[name][0].__name__} with the published {name} configuration."
    return create


for _name in MODEL_CONFIGS:
    register_model(_entrypoint(_name))
