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

from torch.utils.checkpoint import checkpoint

from itpn_ds.models.classifier import TimmClassifier
from itpn_ds.models.hivit import GradCheckpointing, OptimizerMetadata, SizedInput, StagedBlocks, drop_path_rates
from itpn_ds.models.layers import (Block, ConvMlpBlock, ConvPatchMerge, Mlp, SplitQKVAttention, SwiGLU,
                                   init_linear_and_norm_, resize_position_embedding, square_size)


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


class FastITPNBackbone(SizedInput, StagedBlocks, GradCheckpointing, OptimizerMetadata, nn.Module):
    """NCHW conv stages (``depth_stage1``, merge, ``depth_stage2``, merge) then ``depth`` main blocks.

    Input (B, 3, H, W) with H = W = ``img_size`` (any multiples of the patch size with ``dynamic_img_size``);
    dense backbones (``itpn_ds.models.dense``) take any sides that are multiples of their coarsest stride and
    resize the position embedding to the token grid. Subclasses add their outputs and call ``init_weights``
    once everything is registered.
    """

    __constants__ = ["num_stage_entries", "dynamic_img_size"]

    # New parts when fine-tuning from pre-training (models/loading.py): ``norm`` is the final backbone norm here,
    # while a pre-training checkpoint's ``norm.`` is the norm of its fused pyramid output.
    head_prefixes = ("head.", "norm.")

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 512,
                 depth_stage1: int = 3, depth_stage2: int = 3, depth: int = 24, num_heads: int = 8,
                 bridge_mlp_ratio: float = 3.0, mlp_ratio: float = 3.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, init_values: float | None = 0.1,
                 naiveswiglu: bool = True, layernorm_eps: float = 1e-6, dynamic_img_size: bool = False):
        super().__init__()
        img_size = square_size(img_size)
        if img_size % patch_size or patch_size % 4:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}, itself a multiple of 4")
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.num_features, self.depth, self.num_main_blocks = embed_dim, depth, depth
        self.num_stage_blocks = depth_stage1 + depth_stage2
        self.grid = img_size // patch_size
        self.dynamic_img_size = dynamic_img_size
        self.grad_ckpt_every = 0
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
        self.num_stage_entries = len(self.blocks) - depth

    def init_weights(self) -> None:
        """Truncated-normal position embedding, then Linear weights and LayerNorms (as published; convs keep
        PyTorch's default init)."""
        trunc_normal_(self.pos_embed, std=0.02)
        init_linear_and_norm_(self)

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images -> (tokens (B, N, D) row-major, [stage-1 map (B, D/4, H/4, W/4), stage-2 map (B, D/2, H/8, W/8)]),
        each stage map taken before its merge."""
        self.check_input(x)
        x = self.patch_embed(x)
        features: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):  # TorchScript loses the blocks of a sliced ModuleList: no slices
            if hasattr(blk, "reduction"):  # a merge (ConvPatchMerge; TorchScript: see HiViT.forward_main)
                features.append(x)
            if i < self.num_stage_entries:
                if self.checkpoints(i) and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
        return x.flatten(2).transpose(1, 2), features

    def add_position(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens (B, N, D) + the position embedding of the model's grid, or resized to an h×w ``grid``."""
        pos = self.pos_embed if grid is None else resize_position_embedding(self.pos_embed, grid)
        return self.pos_drop(tokens + pos)

    def forward_main(self, x: torch.Tensor, collect: list[int] | None = None
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Main blocks on tokens (B, N, D) -> (tokens, [output of main block i for i in ``collect``])."""
        collected: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            if i >= self.num_stage_entries:
                if self.checkpoints(i) and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
                if collect is not None and i - self.num_stage_entries in collect:
                    collected.append(x)
        return x, collected


class FastITPN(TimmClassifier, FastITPNBackbone):
    """Fast-iTPN classifier: backbone -> ``norm`` -> mean pool -> ``head`` (timm's classifier API:
    ``TimmClassifier``)."""

    def __init__(self, num_classes: int = 1000, global_pool: str = "avg", convmlp: bool = True, subln: bool = True,
                 init_scale: float = 0.01, **kwargs):
        if not (convmlp and subln):
            raise ValueError("FastITPN implements the published layout (convmlp=True, subln=True); "
                             "use ITPN for the non-convolutional HiViT stages")
        super().__init__(**kwargs)
        self.norm = self.norm_layer(self.embed_dim)
        self.init_classifier(num_classes, global_pool)
        self.init_weights()
        if isinstance(self.head, nn.Linear):
            self.head.weight.data.mul_(init_scale)
            self.head.bias.data.mul_(init_scale)

    def forward_tokens(self, x: torch.Tensor, collect: list[int] | None = None
                       ) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int] | None]:
        """Images -> (main-block tokens (B, N, D), [outputs of main blocks ``collect``], token grid or None)."""
        grid = self.token_grid(x)
        tokens, _ = self.forward_stages(x)
        tokens, collected = self.forward_main(self.add_position(tokens, grid), collect)
        return tokens, collected, grid

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Normed tokens (B, h, w, D) -> logits (B, num_classes), or pooled features (B, D) with
        ``pre_logits`` (``global_pool=''``: per token, (B, h, w, ...))."""
        x = self.pool(x)
        return x if pre_logits else self.head(x)
