"""Dense backbones: iTPN's pre-trained pyramid as the multi-scale features of segmentation and detection.

The pyramid (``itpn_ds.models.pyramid``) gives three sub-token levels at strides 16, 8 and 4. A
``DenseLayout`` turns them into the levels a dense head takes, as the published dense backbones do
(``docs/dense.md`` maps each to its published config):

* ``segmentation`` (seg/backbone/iTPN.py, ``num_outs=4``): each pyramid level concatenated with the stage
  feature of its stride (stride 4: the stage-1 map before the first merge, D/4 channels; 8: the stage-2 map,
  D/2; 16: the main-block tokens, D), then a 2×2 max-pooled copy of the stride-16 level at stride 32:
  channels F + D/4, F + D/2, F + D, F + D (iTPN-B, F = 256: 384, 512, 768, 768); ``fpn_depth`` 2.
* ``detection`` (det/mmdet/models/backbones/iTPN_*.py, ``num_outs=5``): the pyramid levels alone (F = 256
  channels) and two more, each a 2×2 average pool of the one before, at strides 32 and 64; ``fpn_depth`` 1.

Inputs: any (B, 3, H, W) with H and W multiples of the layout's coarsest stride (32 or 64). The absolute
position embedding and every relative-position bias table are resampled (bicubic) to the input's H/16 × W/16
token grid, the resize that loading applies to weights trained at another resolution; attention stays
global, as in pre-training (see docs/dense.md for why not windows).

timm: ``timm.create_model(name, features_only=True, out_indices=..., layout=...)`` builds the dense
backbone of a registered name's family (``itpn_ds.models.registry``) and wraps it in timm's own
``FeatureGetterNet``, which calls ``forward_intermediates`` and carries ``feature_info`` (channels, reduction).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models._features import feature_take_indices
from torch import nn

from itpn_ds.models.fast_itpn import FastITPNBackbone
from itpn_ds.models.hivit import HiViT
from itpn_ds.models.itpn import ITPN
from itpn_ds.models.layers import check_image_batch
from itpn_ds.models.pyramid import PYRAMID_PREFIXES, FeaturePyramid, patch_maps_from_nchw, tokens_to_map

PYRAMID_STRIDES = (4, 8, 16)


@dataclass(frozen=True)
class DenseLayout:
    """How the pyramid's three levels become a dense head's inputs (module docstring)."""

    name: str
    concat_stage_features: bool  # each level concatenated with the stage feature of its stride
    pooled_levels: int           # levels added above stride 16, each a 2×2 pool of the one before
    pool: str                    # "max" or "avg"
    fpn_depth: int               # pyramid blocks per level of the published config

    @property
    def strides(self) -> tuple[int, ...]:
        """Output strides in px, finest first."""
        return PYRAMID_STRIDES + tuple(16 * 2 ** (i + 1) for i in range(self.pooled_levels))

    def channels(self, embed_dim: int, fpn_dim: int) -> tuple[int, ...]:
        """Channels of each output level, finest first, for backbone width D = ``embed_dim``."""
        if not self.concat_stage_features:
            return (fpn_dim,) * len(self.strides)
        stage = (embed_dim // 4, embed_dim // 2, embed_dim)
        return tuple(fpn_dim + c for c in stage) + (fpn_dim + embed_dim,) * self.pooled_levels


LAYOUTS = {
    "segmentation": DenseLayout("segmentation", concat_stage_features=True, pooled_levels=1, pool="max", fpn_depth=2),
    "detection": DenseLayout("detection", concat_stage_features=False, pooled_levels=2, pool="avg", fpn_depth=1),
}


def dense_layout(name: str) -> DenseLayout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown dense layout {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


class DenseFeatures:
    """Mixin for a backbone with the pyramid (``FeaturePyramid``) and ``forward_pyramid_inputs``: the layout's
    levels, timm's ``feature_info`` and ``forward_intermediates``, and the input check."""

    layout: DenseLayout
    embed_dim: int
    fpn_dim: int
    patch_embed: nn.Module
    # a checkpoint without a pyramid (a classifier) or with fewer pyramid blocks leaves these at init
    fresh_when_absent = PYRAMID_PREFIXES

    @property
    def feature_info(self) -> list[dict]:
        """One dict per output level, finest first: ``num_chs``, ``reduction`` (stride in px), ``module``."""
        modules = [f"fpn_modules.{i}" for i in (2, 1, 0)] + ["fpn_modules.0"] * self.layout.pooled_levels
        return [dict(num_chs=c, reduction=s, module=m) for c, s, m in
                zip(self.layout.channels(self.embed_dim, self.fpn_dim), self.layout.strides, modules)]

    @property
    def coarsest_stride(self) -> int:
        return self.layout.strides[-1]

    def check_input(self, x: torch.Tensor) -> None:
        check_image_batch(x, self.patch_embed.proj.in_channels, self.coarsest_stride,
                          f"{self.layout.name} layout's coarsest stride")

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) -> the layout's levels, finest first: (B, C_i, H / s_i, W / s_i) for the
        ``feature_info`` channels C_i and strides s_i."""
        tokens, features, grid = self.forward_pyramid_inputs(x)
        levels = self.forward_pyramid(tokens, features)  # strides 16, 8, 4
        if self.layout.concat_stage_features:
            stage = (tokens[..., None, None, :], features[1], features[0])
            levels = [torch.cat([level, f], dim=-1) for level, f in zip(levels, stage)]
        maps = [tokens_to_map(level, grid) for level in reversed(levels)]
        pool = F.max_pool2d if self.layout.pool == "max" else F.avg_pool2d
        for _ in range(self.layout.pooled_levels):
            maps.append(pool(maps[-1], kernel_size=2, stride=2))
        return maps

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | tuple[int, ...] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = True) -> list[torch.Tensor]:
        """timm's feature API (what ``FeatureGetterNet`` calls): the levels ``indices`` (None: all; an int n:
        the last n), in ``output_fmt`` NCHW or NHWC. The levels are the outputs, so there is no final norm and
        no separate final output (``norm`` and ``intermediates_only=False`` are refused)."""
        if norm or not intermediates_only:
            raise ValueError("a dense iTPN backbone returns its pyramid levels only (norm=False, "
                             "intermediates_only=True)")
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be NCHW or NHWC, got {output_fmt!r}")
        take, _ = feature_take_indices(len(self.layout.strides), indices)
        levels = self.forward_levels(x)
        out = [levels[i] for i in take]
        return [m.permute(0, 2, 3, 1) for m in out] if output_fmt == "NHWC" else out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_levels(x)


class DenseITPN(DenseFeatures, HiViT):
    """HiViT + iTPN pyramid as a dense backbone (``layout``: ``segmentation`` or ``detection``).

    ``fpn_depth`` None: the layout's published value. Other arguments: ``HiViT``'s.
    """

    head_prefixes = ITPN.head_prefixes  # a classifier checkpoint's head: dropped (models/loading.py)

    def __init__(self, layout: str = "segmentation", fpn_dim: int = 256, fpn_depth: int | None = None, **kwargs):
        spec = dense_layout(layout)
        super().__init__(num_outs=3, fpn_dim=fpn_dim, fpn_depth=spec.fpn_depth if fpn_depth is None else fpn_depth,
                         **kwargs)
        self.layout = spec
        self.init_weights()


class DenseFastITPN(FeaturePyramid, DenseFeatures, FastITPNBackbone):
    """Fast-iTPN backbone + iTPN pyramid (from the NCHW stage maps, as ``FastITPNClipDistill``) as a dense
    backbone; ``fpn_mlp_ratio`` as there. Other arguments: ``FastITPNBackbone``'s."""

    def __init__(self, layout: str = "segmentation", fpn_dim: int = 256, fpn_depth: int | None = None,
                 fpn_mlp_ratio: float = 4.0, **kwargs):
        spec = dense_layout(layout)
        super().__init__(**kwargs)
        self.layout = spec
        self.build_pyramid(self.dims, 3, fpn_dim, spec.fpn_depth if fpn_depth is None else fpn_depth,
                           fpn_mlp_ratio, self.norm_layer)
        self.init_weights()

    def forward_pyramid_inputs(self, x: torch.Tensor
                               ) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
        """As ``HiViT.forward_pyramid_inputs``: (main-block tokens (B, N, D), [stage-1 (B, N, 4, 4, D/4),
        stage-2 (B, N, 2, 2, D/2)], token grid (H/16, W/16))."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens, maps = self.forward_stages(x)
        tokens = self.forward_main(self.add_position(tokens, grid))[0]
        return tokens, [patch_maps_from_nchw(m, grid) for m in maps], grid


class DenseTaskModel:
    """Mixin for a task model (segmentation, detection) holding a dense backbone at ``backbone_prefix``.

    Layer-wise lr decay: the backbone's parameters keep the backbone's layer ids (``OptimizerMetadata``:
    embedding 0, blocks, pyramid last); every other part (decode and auxiliary heads, RPN, RoI heads) gets the
    last layer, as the published layer-decay constructors give everything outside ``backbone.blocks``.
    """

    backbone_prefix: str  # e.g. "backbone." (ends with a dot)

    @property
    def dense_backbone(self) -> nn.Module:
        return self.get_submodule(self.backbone_prefix.rstrip("."))

    @property
    def num_lr_layers(self) -> int:
        return self.dense_backbone.num_lr_layers

    def lr_layer_id(self, name: str) -> int:
        if name.startswith(self.backbone_prefix):
            return self.dense_backbone.lr_layer_id(name[len(self.backbone_prefix):])
        return self.num_lr_layers - 1

    def no_weight_decay(self) -> set[str]:
        return {self.backbone_prefix + name for name in self.dense_backbone.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True, every_k: int = 1) -> None:
        self.dense_backbone.set_grad_checkpointing(enable, every_k)
