"""Pooled image features of a backbone, as a frozen-feature probe reads them (``itpn_ds.engine.probe``).

Two features per image, whatever the model was built for (pre-training, classification):

* ``backbone``: what the classifier fine-tuned from these weights pools before its first new layer: the mean
  over tokens of the main blocks' output, the input of ``ITPN``'s ``fc_norm``. Fast-iTPN's classifier normalises
  each token first with its own ``norm`` (a new LayerNorm when fine-tuning starts: no affine), then pools;
  a pre-training model gets that LayerNorm without affine, a Fast-iTPN classifier its trained ``norm``.
* ``pyramid``: the mean over tokens of the pyramid's coarsest level (stride 16, ``fpn_dim`` wide), the level a
  dense head reads first; only where the model has the pyramid (pre-training models, dense backbones).

No masking: every patch is visible (a pre-training model's mask token is unused).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from itpn_ds.models.fast_clip_distill import FastITPNClipDistill
from itpn_ds.models.fast_itpn import FastITPN
from itpn_ds.models.hivit import HiViT

BACKBONE, PYRAMID = "backbone", "pyramid"


def pooled_dims(model: nn.Module) -> dict[str, int]:
    """Name -> width of each pooled feature ``model`` gives (``pooled_features``); ValueError for another model."""
    if not isinstance(model, (HiViT, FastITPN, FastITPNClipDistill)):
        raise ValueError(f"{type(model).__name__} has no pooled features for a probe: give an iTPN or Fast-iTPN "
                         "pre-training model or classifier")
    dims = {BACKBONE: model.embed_dim}
    if getattr(model, "num_outs", 1) > 1:
        dims[PYRAMID] = model.fpn_dim
    return dims


def pooled_features(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Images (B, 3, H, W) at the model's size -> name -> (B, width) features (``pooled_dims``), in the
    model's compute dtype."""
    dims = pooled_dims(model)
    if isinstance(model, HiViT):
        tokens, _, _ = model.forward_pyramid_inputs(images)
        pooled_tokens = tokens
    else:
        stage_tokens, _ = model.forward_stages(images)
        tokens = model.forward_main(model.add_position(stage_tokens))[0]
        pooled_tokens = (model.norm(tokens) if isinstance(model, FastITPN)
                         else F.layer_norm(tokens, (model.embed_dim,), eps=model.block_config.layernorm_eps))
    out = {BACKBONE: pooled_tokens.mean(dim=1)}
    if PYRAMID in dims:
        out[PYRAMID] = model.forward_coarsest_level(tokens).flatten(1, 3).mean(dim=1)
    return out
