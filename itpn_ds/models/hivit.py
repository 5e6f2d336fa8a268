"""HiViT backbone with iTPN's feature pyramid.

``blocks`` is one list, as in the published code: ``mlp_depth1`` MLP-only blocks at D/4 on 4×4 sub-tokens,
PatchMerge, ``mlp_depth2`` MLP-only blocks at D/2 on 2×2 sub-tokens, PatchMerge, then ``depth`` attention
blocks at D on one token per 16×16 patch. Layer-wise lr decay counts every block of that list as a layer; a
PatchMerge shares the layer of the block before it (as the published lr_decay.py).

The pyramid (built when ``num_outs`` > 1, ``itpn_ds.models.pyramid``) goes back up: 16→8 by PatchSplit plus a
lateral Linear from the stage-2 map, ``fpn_depth`` MLP blocks; 8→4 likewise from stage 1; one MLP block per level
at the output.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils.checkpoint import checkpoint
from timm.layers import trunc_normal_

from itpn_ds.models.layers import (PatchEmbed, PatchMerge, attention_block, built_for_message, check_image_batch,
                                   init_linear_and_norm_, mlp_block, relative_position_index,
                                   resize_position_embedding, square_size)
from itpn_ds.models.pyramid import FeaturePyramid


def drop_path_rates(total: int, max_rate: float) -> list[float]:
    """Stochastic depth rising linearly over all ``total`` blocks of all stages."""
    if total <= 1:
        return [0.0] * total
    return [max_rate * i / (total - 1) for i in range(total)]


class GradCheckpointing:
    """Activation-checkpointing policy shared by every block loop: off, every block, or every k-th block.

    The host sets ``grad_ckpt_every = 0`` in its ``__init__`` (an instance attribute, as TorchScript needs).
    Loops that TorchScript compiles call their blocks directly and checkpoint only outside scripting
    (``if self.checkpoints(i) and not torch.jit.is_scripting()``); the others use ``run_block``.
    """

    def set_grad_checkpointing(self, enable: bool = True, every_k: int = 1) -> None:
        if every_k < 1:
            raise ValueError(f"every_k must be >= 1, got {every_k}")
        self.grad_ckpt_every = every_k if enable else 0

    def checkpoints(self, index: int) -> bool:
        """Whether block number ``index`` runs under activation checkpointing now (training only)."""
        return self.grad_ckpt_every > 0 and self.training and index % self.grad_ckpt_every == 0

    def run_block(self, index: int, block: nn.Module, *args):
        """Call ``block(*args)``, checkpointed when the policy selects block number ``index``."""
        if self.checkpoints(index):
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


EMBEDDING_PREFIXES = ("patch_embed", "absolute_pos_embed", "pos_embed", "mask_token", "cls_token")


class StagedBlocks:
    """``blocks`` holds the early stages (MLP or conv blocks and merges: ``num_stage_entries`` entries) and then
    ``num_main_blocks`` attention blocks, as the published models list them.

    TorchScript: the block counts are module constants (``__constants__`` of the host class), so scripted
    loops slice ``blocks`` directly; these properties are Python-only.
    """

    __jit_unused_properties__ = ["stage_blocks", "main_blocks", "num_lr_layers"]

    @property
    def stage_blocks(self) -> nn.ModuleList:
        return self.blocks[:-self.num_main_blocks]

    @property
    def main_blocks(self) -> nn.ModuleList:
        return self.blocks[-self.num_main_blocks:]


class OptimizerMetadata:
    """What the engine's parameter groups need: names without weight decay and layer ids for lr decay.

    Layer ids: 0 = patch embed, position embedding and tokens; then one layer per entry of ``blocks``, except
    that an entry of a type in ``merges_without_layer`` shares the layer of the entry before it; last = the rest
    (heads, final norms, pyramid). Fast-iTPN's script counts every entry (merges too); iTPN's scripts
    (``itpn_clip/utils/lr_decay.py``) give a PatchMerge the layer of the block before it.
    """

    merges_without_layer: tuple[type[nn.Module], ...] = ()  # (no annotation: TorchScript reads class annotations)

    def no_weight_decay(self) -> set[str]:
        """Parameter names without weight decay: position embeddings, mask tokens, RPE tables, norms, biases."""
        return {name for name, p in self.named_parameters()
                if p.ndim <= 1 or name.endswith(EMBEDDING_PREFIXES[1:]) or "relative_position_bias_table" in name}

    def block_lr_layers(self) -> list[int]:
        """The layer id of each entry of ``blocks`` (the first layer after the embedding is 1)."""
        layers, layer = [], 0
        for block in self.blocks:
            layer += not isinstance(block, self.merges_without_layer)
            layers.append(layer)
        return layers

    @property
    def num_lr_layers(self) -> int:
        """Layers for layer-wise lr decay: the embedding, the block layers, and the rest (the last)."""
        return self.block_lr_layers()[-1] + 2

    def lr_layer_id(self, name: str) -> int:
        """Layer of a parameter for layer-wise lr decay (see the class docstring)."""
        if name.startswith(EMBEDDING_PREFIXES):
            return 0
        if name.startswith("blocks."):
            return self.block_lr_layers()[int(name.split(".")[1])]
        return self.num_lr_layers - 1


class SizedInput:
    """The input-size policy of both backbones: square images at ``img_size``, or with ``dynamic_img_size``
    any sides that are multiples of the patch size (position embeddings resampled to the grid at run time)."""

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` fits the model (``check_image_size``); skipped while TorchScript
        compiles or FX traces the model (the checks read the input's shape)."""
        if not torch.jit.is_scripting():
            if not is_fx_symbolic_tracing():
                self.check_image_size(x)

    def check_image_size(self, x: torch.Tensor) -> None:
        """Images (B, C, H, W), sides multiples of the patch size; square at the model's size unless
        ``dynamic_img_size`` (dense backbones override this to take any multiple of their coarsest stride)."""
        check_image_batch(x, self.patch_embed.proj.in_channels, self.patch_size, "patch size")
        H, W = x.shape[-2:]
        if not self.dynamic_img_size and (H != self.img_size or W != self.img_size):
            raise ValueError(built_for_message(self.img_size, H, W))

    def token_grid(self, x: torch.Tensor) -> tuple[int, int] | None:
        """The (H/16, W/16) token grid of images ``x`` with ``dynamic_img_size``; None (the model's own grid,
        no shape-dependent code for FX and TorchScript) otherwise."""
        if self.dynamic_img_size:
            return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return None


class HiViT(SizedInput, FeaturePyramid, StagedBlocks, GradCheckpointing, OptimizerMetadata, nn.Module):
    """HiViT backbone (+ iTPN pyramid when ``num_outs`` > 1). Input (B, 3, H, W), H = W = ``img_size``; with
    ``dynamic_img_size`` any H, W that are multiples of the patch size (the position embedding and the
    relative-position tables resampled to the token grid at run time, as the dense backbones do)."""

    __constants__ = ["num_stage_entries", "ape", "rpe", "dynamic_img_size"]
    merges_without_layer = (PatchMerge,)

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 512,
                 mlp_depth1: int = 3, mlp_depth2: int = 3, depth: int = 24, num_heads: int = 8,
                 bridge_mlp_ratio: float = 3.0, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 init_values: float | None = None, ape: bool = True, rpe: bool = True, patch_norm: bool = True,
                 num_outs: int = 1, fpn_dim: int = 256, fpn_depth: int = 1, layernorm_eps: float = 1e-6,
                 dynamic_img_size: bool = False):
        super().__init__()
        img_size = square_size(img_size)
        if img_size % patch_size or patch_size % 4:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}, itself a multiple of 4")
        if num_outs not in (1, 2, 3):
            raise ValueError(f"num_outs must be 1, 2 or 3, got {num_outs}")
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.num_features = embed_dim
        self.depth, self.num_main_blocks, self.num_outs = depth, depth, num_outs
        self.grid = img_size // patch_size
        self.ape, self.rpe, self.dynamic_img_size = ape, rpe, dynamic_img_size
        self.grad_ckpt_every = 0
        norm = partial(nn.LayerNorm, eps=layernorm_eps)
        self.norm_layer = norm
        dims = (embed_dim // 4, embed_dim // 2, embed_dim)

        self.patch_embed = PatchEmbed(patch_size, dims[0], in_chans, norm if patch_norm else None)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        if rpe:
            self.register_buffer("relative_position_index", relative_position_index(self.grid))
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = iter(drop_path_rates(mlp_depth1 + mlp_depth2 + depth, drop_path_rate))
        stage = lambda dim, n: [mlp_block(dim, bridge_mlp_ratio, norm, init_values, next(dpr), drop_rate)  # noqa: E731
                                for _ in range(n)]
        self.blocks = nn.ModuleList([
            *stage(dims[0], mlp_depth1), PatchMerge(dims[0], norm),
            *stage(dims[1], mlp_depth2), PatchMerge(dims[1], norm),
            *[attention_block(embed_dim, num_heads, mlp_ratio, norm, qkv_bias, self.grid if rpe else None,
                              init_values, next(dpr), drop_rate, attn_drop_rate) for _ in range(depth)]])
        self.num_stage_entries = len(self.blocks) - depth
        if num_outs > 1:
            self.build_pyramid(dims, num_outs, fpn_dim, fpn_depth, mlp_ratio, norm)

    def init_weights(self) -> None:
        """Truncated-normal Linear weights, zero biases, unit LayerNorms (as the published models)."""
        init_linear_and_norm_(self)

    # ---- forward pieces -----------------------------------------------------------------------------------
    def forward_stages(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images -> (tokens (B, N, D), [stage-1 map (B, N, 4, 4, D/4), stage-2 map (B, N, 2, 2, D/2)]).

        ``ids_keep`` (B, L) keeps only those patches (MAE-style visible tokens); N becomes L.
        """
        self.check_input(x)
        x = self.patch_embed(x)
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[:, :, None, None, None].expand(-1, -1, x.shape[2], x.shape[3], x.shape[4]))
        features: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):  # TorchScript loses the blocks of a sliced ModuleList: no slices
            if hasattr(blk, "reduction"):  # a merge (see forward_main)
                features.append(x)
            if i < self.num_stage_entries:
                if self.checkpoints(i) and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
        return x[:, :, 0, 0, :], features

    def position_embedding(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(1, h·w, D) absolute position embedding for an h×w token ``grid``, bicubically resized when the grid
        is not the model's own (None: the model's own)."""
        if grid is None:
            return self.absolute_pos_embed
        return resize_position_embedding(self.absolute_pos_embed, grid)

    def add_position(self, x: torch.Tensor, grid: tuple[int, int] | None = None,
                     ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (B, N, D) + the position embedding of ``grid`` (None: the model's own), of the kept
        patches ``ids_keep`` (B, N) where given."""
        if self.ape:
            pos = self.position_embedding(grid)
            if ids_keep is not None:
                pos = torch.gather(pos.expand(x.shape[0], -1, -1), 1, ids_keep[:, :, None].expand(-1, -1, pos.shape[-1]))
            x = x + pos
        return self.pos_drop(x)

    def rpe_index(self, grid: tuple[int, int] | None = None) -> torch.Tensor | None:
        """(N²,) relative-position index of the model's grid, or of an h×w ``grid`` (into the tables resampled
        to that grid, ``Attention.bias_table``); None without RPE."""
        if not self.rpe:
            return None
        if grid is None or (grid[0] == self.grid and grid[1] == self.grid):
            return self.relative_position_index.view(-1)
        return relative_position_index(grid, self.relative_position_index.device).view(-1)

    def forward_main(self, x: torch.Tensor, rpe_index: torch.Tensor | None,
                     token_grid: tuple[int, int] | None = None, collect: list[int] | None = None
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Main attention blocks on tokens (B, N, D) -> (tokens, [output of main block i for i in ``collect``]).
        ``token_grid`` (h, w): the grid ``rpe_index`` was built for (None: the model's own)."""
        collected: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            # A merge (PatchMerge, a stage entry) does nothing here. The empty branch is for TorchScript: it evaluates
            # hasattr on a module statically and so compiles no 3-argument call of a merge (neither `continue` here
            # nor isinstance, which fails on the renamed types TorchScript gives equal classes, scripts).
            if hasattr(blk, "reduction"):
                pass
            elif i >= self.num_stage_entries:
                if self.checkpoints(i) and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, rpe_index, token_grid, use_reentrant=False)
                else:
                    x = blk(x, rpe_index, token_grid)
                if collect is not None and i - self.num_stage_entries in collect:
                    collected.append(x)
        return x, collected

    def forward_pyramid_inputs(self, x: torch.Tensor
                               ) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
        """Images (B, 3, H, W) -> (main-block tokens (B, N, D), [stage-1 map (B, N, 4, 4, D/4), stage-2 map
        (B, N, 2, 2, D/2)], token grid (H/16, W/16)), N = H/16 · W/16: what the pyramid takes. The position
        embedding and the relative-position tables are resampled to the grid when it is not the model's own."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens, features = self.forward_stages(x)
        tokens = self.forward_main(self.add_position(tokens, grid), self.rpe_index(grid), grid)[0]
        return tokens, features, grid
