"""Fast-iTPN: conv stem and ConvMLP stages, SwiGLU + sub-LN main blocks, APE, no RPE.

``FastITPNBackbone`` is what the classifier (``FastITPN``: + ``norm`` + ``head``) and the CLIP pre-training
model (``FastITPNClipDistill``: + pyramid + distillation heads) share; its parameter names are the published
classifier's, so every backbone key of a pre-training checkpoint loads into the classifier.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from timm.layers import trunc_normal_

from itpn_ds.models.hivit import GradCheckpointing, OptimizerMetadata, StagedBlocks, drop_path_rates
from itpn_ds.models.layers import (Block, ConvMlpBlock, ConvPatchMerge, Mlp, SplitQKVAttention, SwiGLU,
                                   init_linear_and_norm_, resize_position_embedding)


class ConvStem(nn.Module):
    """Image (B, 3, H, W) -> (B, D/4, H/4, W/4): a conv with kernel = stride = patch/4."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size // 4, stride=patch_size // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass(frozen=True)
class FastBlockConfig:
    """One Fast-iTPN main block: split-q/k/v attention (biases on q and v) + SwiGLU (or GELU) MLP with sub-LN."""

    dim: int
    num_heads: int
    mlp_ratio: float = 3.0
    qkv_bias: bool = True
    naiveswiglu: bool = True
    drop: float = 0.0
    init_values: float | None = 0.1
    layernorm_eps: float = 1e-6

    def build(self, drop_path: float = 0.0) -> Block:
        norm = partial(nn.LayerNorm, eps=self.layernorm_eps)
        hidden = int(self.dim * self.mlp_ratio)
        mlp = SwiGLU(self.dim, hidden, norm, self.drop) if self.naiveswiglu else \
            Mlp(self.dim, hidden, self.drop, subln_norm=norm)
        attn = SplitQKVAttention(self.dim, self.num_heads, self.qkv_bias, proj_drop=self.drop)
        return Block(self.dim, mlp, norm, attn, self.init_values, drop_path)


class FastITPNBackbone(StagedBlocks, GradCheckpointing, OptimizerMetadata, nn.Module):
    """NCHW conv stages (``depth_stage1``, merge, ``depth_stage2``, merge) then ``depth`` main blocks.

    Input (B, 3, H, W) with H = W = ``img_size``; dense backbones (``itpn_ds.models.dense``) take any sides
    that are multiples of their coarsest stride and resize the position embedding to the token grid.
    Subclasses add their outputs and call ``init_weights`` once everything is registered.
    """

    # New parts when fine-tuning from pre-training (models/loading.py): ``norm`` is the final backbone norm here,
    # while a pre-training checkpoint's ``norm.`` is the norm of its fused pyramid output.
    head_prefixes = ("head.", "norm.")

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 512,
                 depth_stage1: int = 3, depth_stage2: int = 3, depth: int = 24, num_heads: int = 8,
                 bridge_mlp_ratio: float = 3.0, mlp_ratio: float = 3.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, init_values: float | None = 0.1,
                 naiveswiglu: bool = True, layernorm_eps: float = 1e-6):
        super().__init__()
        if img_size % patch_size or patch_size % 4:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}, itself a multiple of 4")
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.num_features, self.depth, self.num_main_blocks = embed_dim, depth, depth
        self.num_stage_blocks = depth_stage1 + depth_stage2
        self.grid = img_size // patch_size
        self.norm_layer = norm = partial(nn.LayerNorm, eps=layernorm_eps)
        self.dims = dims = (embed_dim // 4, embed_dim // 2, embed_dim)
        self.block_config = FastBlockConfig(embed_dim, num_heads, mlp_ratio, qkv_bias, naiveswiglu, drop_rate,
                                            init_values, layernorm_eps)
        dpr = iter(drop_path_rates(self.num_stage_blocks + depth, drop_path_rate))
        stage = lambda dim, n: [ConvMlpBlock(dim, bridge_mlp_ratio, norm, next(dpr)) for _ in range(n)]  # noqa: E731

        self.patch_embed = ConvStem(patch_size, dims[0], in_chans)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList([
            *stage(dims[0], depth_stage1), ConvPatchMerge(dims[0], norm),
            *stage(dims[1], depth_stage2), ConvPatchMerge(dims[1], norm),
            *[self.block_config.build(next(dpr)) for _ in range(depth)]])

    def init_weights(self) -> None:
        """Truncated-normal position embedding, then Linear weights and LayerNorms (as published; convs keep
        PyTorch's default init)."""
        trunc_normal_(self.pos_embed, std=0.02)
        init_linear_and_norm_(self)

    def check_input(self, x: torch.Tensor) -> None:
        H, W = x.shape[-2:]
        if x.ndim != 4 or H % self.patch_size or W % self.patch_size or H != W:
            raise ValueError(f"{type(self).__name__} takes square images (B, C, H, W) with sides a multiple of "
                             f"{self.patch_size}, got {tuple(x.shape)}")
        if H // self.patch_size != self.grid:
            raise ValueError(f"this model's position embedding is for {self.img_size} px; got {H} px")

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images -> (tokens (B, N, D) row-major, [stage-1 map (B, D/4, H/4, W/4), stage-2 map (B, D/2, H/8, W/8)]),
        each stage map taken before its merge."""
        self.check_input(x)
        x = self.patch_embed(x)
        features = []
        for i, blk in enumerate(self.stage_blocks):
            if isinstance(blk, ConvPatchMerge):
                features.append(x)
            x = self.run_block(i, blk, x)
        return x.flatten(2).transpose(1, 2), features

    def add_position(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens (B, N, D) + the position embedding of the model's grid, or resized to an h×w ``grid``."""
        return self.pos_drop(tokens + resize_position_embedding(self.pos_embed, grid or self.grid))

    def forward_main(self, x: torch.Tensor, capture_after: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Main blocks on tokens (B, N, D); also returns the output of main block ``capture_after``."""
        captured = None
        offset = len(self.stage_blocks)
        for i, blk in enumerate(self.main_blocks):
            x = self.run_block(offset + i, blk, x)
            if i == capture_after:
                captured = x
        return x, captured


class FastITPN(FastITPNBackbone):
    """Fast-iTPN classifier: backbone -> ``norm`` -> mean pool -> ``head``."""

    def __init__(self, num_classes: int = 1000, convmlp: bool = True, subln: bool = True, init_scale: float = 0.01,
                 **kwargs):
        if not (convmlp and subln):
            raise ValueError("FastITPN implements the published layout (convmlp=True, subln=True); "
                             "use ITPN for the non-convolutional HiViT stages")
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.norm = self.norm_layer(self.embed_dim)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()
        if isinstance(self.head, nn.Linear):
            self.head.weight.data.mul_(init_scale)
            self.head.bias.data.mul_(init_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> normed tokens (B, N, D)."""
        tokens, _ = self.forward_stages(x)
        return self.norm(self.forward_main(self.add_position(tokens))[0])

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = tokens.mean(dim=1)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
