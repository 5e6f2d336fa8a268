"""iTPN's feature pyramid, shared by the HiViT (iTPN) and Fast-iTPN model families.

From the main-block tokens back up to finer levels: 16→8 by ``PatchSplit`` plus a lateral Linear from the
stage-2 map, ``fpn_depth`` MLP blocks; 8→4 likewise from the stage-1 map; one MLP block per level at the
output. Every level is a sub-token map (B, N, s, s, F) with N patches (16×16 px each) and s = 1, 2, 4 per side.

``FeaturePyramid`` is a mixin: ``build_pyramid`` registers its modules on the model itself, so the parameter
names are the published top-level ones (``align_dim_16tofpn``, ``fpn_modules``, ``align_dim_16to8``,
``split_16to8``, ``block_16to8``, ``align_dim_8to4``, ``split_8to4``, ``block_8to4``).
"""
from __future__ import annotations


import torch
from torch import nn

from itpn_ds.models.layers import NormLayer, PatchSplit, as_hw, mlp_block

# the pyramid's parameter-name prefixes (the module docstring's names)
PYRAMID_PREFIXES = ("align_dim_", "fpn_modules", "split_", "block_16to8", "block_8to4")


def patch_maps_from_nchw(x: torch.Tensor, grid: int | tuple[int, int]) -> torch.Tensor:
    """NCHW map (B, C, h·s, w·s) -> sub-token map (B, h·w, s, s, C) for an h×w patch ``grid`` (an int g: g×g).

    Patch n = row·w + col (row-major, the order of the tokens and of ``bool_masked_pos``) takes the s×s
    pixels of its 16×16 patch at that resolution, in (row, col) order: the layout ``PatchEmbed`` produces and
    ``PatchSplit`` and ``tokens_to_map`` assume (this is the inverse of ``tokens_to_map``).
    """
    B, C, H, W = x.shape
    h, w = as_hw(grid)
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"expected a map whose sides are the same multiple of the patch grid {h}x{w}, "
                         f"got {tuple(x.shape)}")
    s = H // h
    return x.view(B, C, h, s, w, s).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, s, s, C)


def tokens_to_map(x: torch.Tensor, grid: int | tuple[int, int]) -> torch.Tensor:
    """Sub-token map (B, N, s, s, C) with N = h·w patches of an h×w ``grid`` -> NCHW (B, C, h·s, w·s)."""
    B, _, s, _, C = x.shape
    h, w = as_hw(grid)
    return x.view(B, h, w, s, s, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * s, w * s)


class FeaturePyramid:
    """Mixin for an ``nn.Module`` that also provides ``run_block`` (``GradCheckpointing``); it sets ``num_outs``
    and ``fpn_dim`` (no class-level annotations: TorchScript would read them as the host's attribute types)."""

    def build_pyramid(self, dims: tuple[int, int, int], num_outs: int, fpn_dim: int, fpn_depth: int,
                      mlp_ratio: float, norm: NormLayer) -> None:
        """Register the pyramid for stage dims ``dims`` = (D/4, D/2, D) with ``num_outs`` (2 or 3) levels."""
        if num_outs not in (2, 3):
            raise ValueError(f"the feature pyramid has 2 or 3 levels, got num_outs={num_outs}")
        self.num_outs, self.fpn_dim = num_outs, fpn_dim
        fpn_block = lambda: mlp_block(fpn_dim, mlp_ratio, norm)  # noqa: E731
        self.align_dim_16tofpn = nn.Linear(dims[2], fpn_dim) if dims[2] != fpn_dim else None
        self.fpn_modules = nn.ModuleList([fpn_block() for _ in range(num_outs)])
        self.align_dim_16to8 = nn.Linear(dims[1], fpn_dim, bias=False)
        self.split_16to8 = PatchSplit(dims[2], fpn_dim, norm)
        self.block_16to8 = nn.Sequential(*[fpn_block() for _ in range(fpn_depth)])
        if num_outs > 2:
            self.align_dim_8to4 = nn.Linear(dims[0], fpn_dim, bias=False)
            self.split_8to4 = PatchSplit(fpn_dim, fpn_dim, norm)
            self.block_8to4 = nn.Sequential(*[fpn_block() for _ in range(fpn_depth)])

    def forward_pyramid(self, x: torch.Tensor, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tokens (B, N, D) + [stage-1 map (B, N, 4, 4, D/4), stage-2 map (B, N, 2, 2, D/2)]
        -> [(B, N, 1, 1, F), (B, N, 2, 2, F), (B, N, 4, 4, F)][:num_outs]."""
        outs = [self._coarsest_input(x)]
        x = x[..., None, None, :]
        x = self.block_16to8(self.split_16to8(x) + self.align_dim_16to8(features[1]))
        outs.append(x)
        if self.num_outs > 2:
            x = self.block_8to4(self.split_8to4(x) + self.align_dim_8to4(features[0]))
            outs.append(x)
        return [self.run_block(i, blk, out) for i, (blk, out) in enumerate(zip(self.fpn_modules, outs))]

    def forward_coarsest_level(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) -> the coarsest level alone, (B, N, 1, 1, F): ``forward_pyramid``'s first output
        without computing the finer ones."""
        return self.run_block(0, self.fpn_modules[0], self._coarsest_input(x))

    def _coarsest_input(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) -> (B, N, 1, 1, F), the input of the coarsest level's block."""
        x = x[..., None, None, :]
        return x if self.align_dim_16tofpn is None else self.align_dim_16tofpn(x)
