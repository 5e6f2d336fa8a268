"""Fast-iTPN pre-training against CLIP targets: ``ITPNClipDistill``'s objective on the Fast-iTPN backbone.

There is no published Fast-iTPN pre-training code; this model is ours. It keeps the published Fast-iTPN
backbone exactly (so its keys load into ``FastITPN``) and adds iTPN's pyramid and CLIP-distillation heads
exactly as ``ITPNClipDistill`` has them (same names, same shapes).

Per-patch masking after the stage-2 merge works as in HiViT. Every early-stage op of Fast-iTPN stays inside
one 16×16 patch: the stem is a 4×4 stride-4 conv (each output pixel sees one 4×4 pixel cell, patch-aligned),
the ConvMLP blocks are 1×1 convs, GELU and LayerNorms over channels (per pixel), and the two merges are 2×2
stride-2 convs on patch-aligned maps (4×4 -> 2×2 -> 1×1 cells per patch). So the stage-2 output of a patch
is a function of that patch's pixels only, and replacing it by the mask token removes the patch from
everything downstream except the lateral pyramid inputs (the stage maps before each merge), exactly as in
the published iTPN. ``tests/test_fast_clip_distill.py`` checks both facts.
"""
from __future__ import annotations

import torch

from itpn_ds.models.clip_distill import ClipDistillHeads
from itpn_ds.models.fast_itpn import FastITPNBackbone
from itpn_ds.models.pyramid import FeaturePyramid, patch_maps_from_nchw


class FastITPNClipDistill(FeaturePyramid, ClipDistillHeads, FastITPNBackbone):
    """Fast-iTPN backbone + iTPN pyramid (from the stage maps, converted to (B, N, s, s, C)) + the distillation
    heads; the auxiliary blocks are two more Fast-iTPN main blocks (``cls_pt_layers``).

    ``fpn_mlp_ratio`` is the hidden ratio of the pyramid's GELU MLP blocks (4, as iTPN's pyramid).
    """

    def __init__(self, teacher_dim: int = 768, num_outs: int = 3, fpn_dim: int = 256, fpn_depth: int = 1,
                 fpn_mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, init_values: float | None = 0.1,
                 **kwargs):
        super().__init__(drop_path_rate=drop_path_rate, init_values=init_values, **kwargs)
        self.build_pyramid(self.dims, num_outs, fpn_dim, fpn_depth, fpn_mlp_ratio, self.norm_layer)
        self.build_distill_heads(teacher_dim, self.norm_layer, self.block_config.build, self.num_stage_blocks,
                                 drop_path_rate)
        self.init_weights()
        self.init_mask_token()

    def forward_features(self, x: torch.Tensor, bool_masked_pos: torch.Tensor
                         ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """-> (pyramid levels [(B, N, s, s, F)], aux tokens (B, N, D)); masked patches get ``mask_token``."""
        tokens, maps = self.forward_stages(x)
        tokens = self.mask_patches(tokens, bool_masked_pos)
        tokens, [aux] = self.forward_main(self.add_position(tokens), collect=[self.aux_block_index])
        features = [patch_maps_from_nchw(m, self.grid) for m in maps]
        return self.forward_pyramid(tokens, features), self.forward_aux(aux)

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W), mask (B, N) bool (True = masked) -> (main, aux), each (B, N, teacher_dim)."""
        return self.predict(*self.forward_features(x, bool_masked_pos))
