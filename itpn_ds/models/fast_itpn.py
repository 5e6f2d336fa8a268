"""Fast-iTPN classifier: conv stem and ConvMLP stages, SwiGLU + sub-LN main blocks, APE, no RPE."""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from timm.layers import trunc_normal_

from itpn_ds.models.hivit import GradCheckpointing, OptimizerMetadata, drop_path_rates
from itpn_ds.models.layers import (Block, ConvMlpBlock, ConvPatchMerge, Mlp, SplitQKVAttention, SwiGLU,
                                   init_linear_and_norm_)


class ConvStem(nn.Module):
    """Image (B, 3, H, W) -> (B, D/4, H/4, W/4): a conv with kernel = stride = patch/4."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size // 4, stride=patch_size // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class FastITPN(GradCheckpointing, OptimizerMetadata, nn.Module):
    """Fast-iTPN: NCHW conv stages (``depth_stage1``, merge, ``depth_stage2``, merge) then ``depth`` blocks."""

    # New parts when fine-tuning from pre-training (models/loading.py): ``norm`` is the final backbone norm here,
    # while a pre-training checkpoint's ``norm.`` is the norm of its fused pyramid output.
    head_prefixes = ("head.", "norm.")

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 512,
                 depth_stage1: int = 3, depth_stage2: int = 3, depth: int = 24, num_heads: int = 8,
                 bridge_mlp_ratio: float = 3.0, mlp_ratio: float = 3.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, init_values: float | None = 0.1,
                 num_classes: int = 1000, convmlp: bool = True, naiveswiglu: bool = True, subln: bool = True,
                 layernorm_eps: float = 1e-6, init_scale: float = 0.01):
        super().__init__()
        if not (convmlp and subln):
            raise ValueError("FastITPN implements the published layout (convmlp=True, subln=True); "
                             "use ITPN for the non-convolutional HiViT stages")
        if img_size % patch_size or patch_size % 4:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}, itself a multiple of 4")
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.num_features, self.num_classes, self.depth = embed_dim, num_classes, depth
        self.num_main_blocks = depth
        self.grid = img_size // patch_size
        norm = partial(nn.LayerNorm, eps=layernorm_eps)
        dims = (embed_dim // 4, embed_dim // 2, embed_dim)
        dpr = iter(drop_path_rates(depth_stage1 + depth_stage2 + depth, drop_path_rate))
        stage = lambda dim, n: [ConvMlpBlock(dim, bridge_mlp_ratio, norm, next(dpr)) for _ in range(n)]  # noqa: E731
        hidden = int(embed_dim * mlp_ratio)
        main_mlp = (lambda: SwiGLU(embed_dim, hidden, norm, drop_rate)) if naiveswiglu else \
            (lambda: Mlp(embed_dim, hidden, drop_rate, subln_norm=norm))

        self.patch_embed = ConvStem(patch_size, dims[0], in_chans)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList([
            *stage(dims[0], depth_stage1), ConvPatchMerge(dims[0], norm),
            *stage(dims[1], depth_stage2), ConvPatchMerge(dims[1], norm),
            *[Block(embed_dim, main_mlp(), norm, SplitQKVAttention(embed_dim, num_heads, qkv_bias, proj_drop=drop_rate),
                    init_values, next(dpr)) for _ in range(depth)]])
        self.norm = norm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(init_scale)

    def _init_weights(self, init_scale: float) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        init_linear_and_norm_(self)
        if isinstance(self.head, nn.Linear):
            self.head.weight.data.mul_(init_scale)
            self.head.bias.data.mul_(init_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> normed tokens (B, N, D)."""
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size or H != W:
            raise ValueError(f"FastITPN takes square images with sides a multiple of {self.patch_size}, got {H}x{W}")
        if H // self.patch_size != self.grid:
            raise ValueError(f"this model's position embedding is for {self.img_size} px; got {H} px")
        x = self.patch_embed(x)
        stages = len(self.blocks) - self.num_main_blocks
        for i, blk in enumerate(self.blocks[:stages]):
            x = self.run_block(i, blk, x)
        x = self.pos_drop(x.flatten(2).transpose(1, 2) + self.pos_embed)
        for i, blk in enumerate(self.blocks[stages:]):
            x = self.run_block(stages + i, blk, x)
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = tokens.mean(dim=1)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
