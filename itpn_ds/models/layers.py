"""Building blocks of HiViT / iTPN.

Token layouts used throughout:
- sub-token maps: (B, N, s, s, C) with N = patches (16x16 px each) and s = 4, 2, 1 sub-tokens per side;
  MLP-only blocks and merges act on the last dim, so masking per 16x16 patch works from the first layer.
- tokens: (B, N, C) once the merges reach one token per patch.
- Fast-iTPN's conv stages keep NCHW maps (B, C, H/4, W/4) until the main blocks.

Parameter names equal the published implementation's, so official checkpoints load without a conversion table.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import flex_attention
from timm.layers import DropPath, trunc_normal_

NormLayer = Callable[[int], nn.Module]
ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

ATTENTION_BACKENDS = ("sdpa", "flex")


@functools.cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """``torch.compile(flex_attention)``, built once (Inductor compiles one fused kernel per shape)."""
    return torch.compile(flex_attention, dynamic=False)


def as_hw(grid: int | tuple[int, int]) -> tuple[int, int]:
    """A token grid as (rows, cols); an int g is the square g×g."""
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def check_image_batch(x: torch.Tensor, in_chans: int, multiple: int, what: str) -> None:
    """Raise ``ValueError`` unless ``x`` is (B, in_chans, H, W) with H and W multiples of ``multiple``; the
    message names the size and ``what`` the multiple is (e.g. "patch size", "coarsest stride")."""
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected images (B, {in_chans}, H, W), got {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if H % multiple or W % multiple:
        raise ValueError(f"image size {H}x{W} is not a multiple of the {what} {multiple}")


def square_size(img_size: int | tuple[int, int] | list[int]) -> int:
    """The side of a square input size given as an int or (H, W) (timm passes its ``input_size[-2:]``)."""
    if isinstance(img_size, int):
        return img_size
    h, w = img_size
    if h != w:
        raise ValueError(f"iTPN models are built for square inputs; got img_size {tuple(img_size)}")
    return int(h)


def built_for_message(img_size: int, H: int, W: int) -> str:
    """The error for an input of another size than a fixed-size model's."""
    return (f"this model is built for {img_size} px inputs (its position embedding and relative position bias are "
            f"for that grid); got {H}x{W} px: rebuild it with img_size={H} and load the checkpoint, which resizes "
            "them, or build it with dynamic_img_size=True")


def relative_position_index(grid: int | tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(h·w, h·w) int64 index, for every (query, key) pair of an h×w token grid (row-major; an int g is g×g),
    into a ((2h-1)·(2w-1), heads) bias table: (row offset + h-1)·(2w-1) + (column offset + w-1)."""
    if isinstance(grid, int):
        h, w = grid, grid
    else:
        h, w = grid
    coords = torch.stack(torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                        indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + h - 1) * (2 * w - 1) + rel[..., 1] + w - 1


def resample_grid(values: torch.Tensor, size: tuple[int, int], to: tuple[int, int]) -> torch.Tensor:
    """(rows·cols, C) values on a ``size`` = (rows, cols) grid -> (to_rows·to_cols, C) on the ``to`` grid,
    bicubic (align_corners=False), computed in fp32 and returned in the input's dtype (differentiable)."""
    grid = values.float().transpose(0, 1).reshape(1, -1, size[0], size[1])
    grid = F.interpolate(grid, size=to, mode="bicubic", align_corners=False)
    return grid.reshape(values.shape[1], -1).transpose(0, 1).to(values.dtype).contiguous()


def resize_position_embedding(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, n², D) absolute position embedding on its n×n grid -> (1, h·w, D) for an h×w token ``grid``
    (bicubic); returned as is when the grid is its own."""
    n = int(math.sqrt(pos.shape[1]))
    if grid[0] == n and grid[1] == n:
        return pos
    return resample_grid(pos[0], (n, n), grid).unsqueeze(0)


def init_linear_and_norm_(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) Linear weights, zero biases, unit LayerNorms over ``module.modules()``, in
    that traversal order (as the published models initialise)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Plain softmax(q·kᵀ/√d + bias)·v in fp32; the reference both fused paths (SDPA, flex) are tested against."""
    attn = (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-2, -1)
    if bias is not None:
        attn = attn + bias.float()
    return (attn.softmax(dim=-1) @ v.float()).to(q.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with an optional relative-position bias, through fused kernels.

    ``backend`` (set by :func:`set_attention_backend`, default ``sdpa``):

    - ``sdpa``: the bias ((B or 1), heads, N, N) is gathered from the table and passed as SDPA's additive
      ``attn_mask``; GPUs then run the memory-efficient kernel (flash attention takes no float mask).
    - ``flex``: FlexAttention with a ``score_mod`` that adds ``table[rpe_index[q, k], head]`` to each score
      inside the kernel, so no (heads, N, N) bias is built and GPUs run the fused flex kernel with the bias.
      CUDA runs the compiled kernel; the CPU runs PyTorch's eager reference (unfused, forward only: torch
      2.14's FlexAttention has no CPU backward). No attention dropout.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, rpe_grid: int | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.backend = "sdpa"
        self.rpe_side = 2 * rpe_grid - 1 if rpe_grid else 0  # the table's offsets per side, (2g-1)
        self.relative_position_bias_table = (
            nn.Parameter(torch.zeros(self.rpe_side ** 2, num_heads)) if rpe_grid else None)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) -> q, k, v each (B, heads, N, C/heads)."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def bias_table(self, table: torch.Tensor, token_grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The bias table for an h×w token grid ``token_grid``: the module's own ((2g-1)², heads) table, resampled
        per head (bicubic, differentiable) to ((2h-1)·(2w-1), heads) when (h, w) is not (g, g); None: own grid.

        This is the resize that loading applies to a table trained at another resolution, done at run time
        for inputs of any (rectangular) size (dense tasks, ``docs/dense.md``). ``table``: the module's table."""
        if token_grid is None:
            return table
        side = self.rpe_side
        offsets = (2 * token_grid[0] - 1, 2 * token_grid[1] - 1)
        return table if offsets == (side, side) else resample_grid(table, (side, side), offsets)

    def position_bias(self, rpe_index: torch.Tensor | None, num_tokens: int,
                      token_grid: tuple[int, int] | None = None) -> torch.Tensor | None:
        """rpe_index (N²,) or (B, N²), N = ``num_tokens``, into the table of grid ``token_grid`` (see
        ``bias_table``) -> bias (1 or B, heads, N, N), or None without a bias table."""
        table = self.relative_position_bias_table
        if table is None or rpe_index is None:
            return None
        n = num_tokens
        bias = self.bias_table(table, token_grid)[rpe_index.reshape(-1, n * n)]
        return bias.view(-1, n, n, self.num_heads).permute(0, 3, 1, 2)

    def position_score_mod(self, rpe_index: torch.Tensor | None, batch: int,
                           token_grid: tuple[int, int] | None = None) -> ScoreMod | None:
        """rpe_index (N²,) or (B, N²) -> a FlexAttention ``score_mod`` adding the bias of (b, head, q, k) to its
        score, reading the table through the index (nothing of size N² per head is built); None without a table."""
        if self.relative_position_bias_table is None or rpe_index is None:
            return None
        table = self.bias_table(self.relative_position_bias_table, token_grid)
        n = math.isqrt(rpe_index.shape[-1])
        index = rpe_index.reshape(-1, n, n).expand(batch, n, n)

        def add_position_bias(score, b, h, q_idx, kv_idx):
            return score + table[index[b, q_idx, kv_idx], h].to(score.dtype)

        return add_position_bias

    def sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpe_index: torch.Tensor | None,
             token_grid: tuple[int, int] | None = None) -> torch.Tensor:
        """q, k, v (B, heads, N, d) -> (B, heads, N, d) through SDPA, the bias as additive mask."""
        bias = self.position_bias(rpe_index, q.shape[2], token_grid)
        if bias is not None:
            bias = bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                              dropout_p=self.attn_drop if self.training else 0.0)

    def flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpe_index: torch.Tensor | None,
             token_grid: tuple[int, int] | None = None) -> torch.Tensor:
        """q, k, v (B, heads, N, d) -> (B, heads, N, d) through FlexAttention, the bias as ``score_mod``."""
        if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            raise RuntimeError("model.attention=flex: FlexAttention has no backward on the CPU (torch "
                               f"{torch.__version__}); train on the CPU with model.attention=sdpa")
        score_mod = self.position_score_mod(rpe_index, q.shape[0], token_grid)
        if q.device.type == "cpu" or torch.compiler.is_compiling():  # a compiled caller fuses it itself
            return flex_attention(q, k, v, score_mod=score_mod)
        return compiled_flex_attention()(q, k, v, score_mod=score_mod)

    def forward(self, x: torch.Tensor, rpe_index: torch.Tensor | None = None,
                token_grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B, N, C); ``rpe_index`` indexes the bias table of token grid ``token_grid`` (None: the own grid)."""
        B, N, C = x.shape
        q, k, v = self.qkv_heads(x)
        if self.backend == "flex" and not torch.jit.is_scripting():  # TorchScript: sdpa only
            out = self.flex(q, k, v, rpe_index, token_grid)
        else:
            out = self.sdpa(q, k, v, rpe_index, token_grid)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


def set_attention_backend(model: nn.Module, backend: str) -> None:
    """Run every :class:`Attention` in ``model`` through ``backend`` (``sdpa`` or ``flex``, see Attention).

    Parameters and their names do not change, so checkpoints load the same under either backend.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    if backend == "flex" and any(m.attn_drop > 0 for m in attentions):
        raise ValueError("the flex attention backend has no attention dropout; build the model with "
                         "attn_drop_rate=0 or use the sdpa backend")
    for m in attentions:
        m.backend = backend


class SplitQKVAttention(Attention):
    """Fast-iTPN attention: separate q/k/v projections, biases on q and v only, no position bias."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qkv_bias=False, rpe_grid=None, attn_drop=attn_drop, proj_drop=proj_drop)
        del self.qkv
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.split_heads(F.linear(x, self.q_proj.weight, self.q_bias)), self.split_heads(self.k_proj(x)),
                self.split_heads(F.linear(x, self.v_proj.weight, self.v_bias)))

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, C/heads)."""
        B, N, C = t.shape
        return t.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 -> GELU -> (optional sub-LN over the hidden dim) -> fc2, on the last dim of any shape."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, subln_norm: NormLayer | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.ffn_ln = subln_norm(hidden) if subln_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.ffn_ln(self.drop(self.act(self.fc1(x))))))


class SwiGLU(nn.Module):
    """SiLU(w1·x) ⊙ (w2·x) -> sub-LN -> w3 (Fast-iTPN's main-block MLP)."""

    def __init__(self, dim: int, hidden: int, norm_layer: NormLayer, drop: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = norm_layer(hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x))))


class Block(nn.Module):
    """Pre-norm residual block: [attention] + MLP, with optional layer scale (gamma) and drop path.

    ``attn=None`` gives HiViT's MLP-only block, which works on sub-token maps of any leading shape.
    """

    def __init__(self, dim: int, mlp: nn.Module, norm_layer: NormLayer, attn: nn.Module | None = None,
                 init_values: float | None = None, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = norm_layer(dim) if attn is not None else None
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp
        use_gamma = init_values is not None and init_values > 0
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values))) if use_gamma and attn is not None else None
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values))) if use_gamma else None

    def forward(self, x: torch.Tensor, rpe_index: torch.Tensor | None = None,
                token_grid: tuple[int, int] | None = None) -> torch.Tensor:
        if self.attn is not None and self.norm1 is not None:
            y = self.attn(self.norm1(x), rpe_index, token_grid)
            x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


def mlp_block(dim: int, mlp_ratio: float, norm_layer: NormLayer, init_values: float | None = None,
              drop_path: float = 0.0, drop: float = 0.0) -> Block:
    """HiViT's MLP-only block (stages 1-2 and the pyramid)."""
    return Block(dim, Mlp(dim, int(dim * mlp_ratio), drop), norm_layer, None, init_values, drop_path)


def attention_block(dim: int, num_heads: int, mlp_ratio: float, norm_layer: NormLayer, qkv_bias: bool = True,
                    rpe_grid: int | None = None, init_values: float | None = None, drop_path: float = 0.0,
                    drop: float = 0.0, attn_drop: float = 0.0) -> Block:
    """iTPN's main transformer block (attention with optional relative-position bias + GELU MLP)."""
    attn = Attention(dim, num_heads, qkv_bias, rpe_grid, attn_drop, drop)
    return Block(dim, Mlp(dim, int(dim * mlp_ratio), drop), norm_layer, attn, init_values, drop_path)


class PatchEmbed(nn.Module):
    """Image (B, 3, H, W) -> sub-token map (B, N, 4, 4, C): a conv with kernel = stride = patch/4."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3, norm_layer: NormLayer | None = None,
                 inner: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.inner = inner
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size // inner, stride=patch_size // inner)
        self.norm = norm_layer(embed_dim) if norm_layer else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        hp, wp, s = H // self.patch_size, W // self.patch_size, self.inner
        x = self.proj(x).view(B, -1, hp, s, wp, s).permute(0, 2, 4, 3, 5, 1).reshape(B, hp * wp, s, s, -1)
        return self.norm(x) if self.norm is not None else x


class PatchMerge(nn.Module):
    """(…, 2s, 2s, C) -> (…, s, s, 2C): concatenate each 2×2 group, LayerNorm(4C), Linear(4C→2C, no bias)."""

    def __init__(self, dim: int, norm_layer: NormLayer):
        super().__init__()
        self.norm = norm_layer(dim * 4)
        self.reduction = nn.Linear(dim * 4, dim * 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class PatchSplit(nn.Module):
    """(B, N, s, s, C) -> (B, N, 2s, 2s, F): LayerNorm(C), Linear(C→4F, no bias), 2×2 pixel shuffle."""

    def __init__(self, dim: int, fpn_dim: int, norm_layer: NormLayer):
        super().__init__()
        self.fpn_dim = fpn_dim
        self.norm = norm_layer(dim)
        self.reduction = nn.Linear(dim, fpn_dim * 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, H, W, _ = x.shape
        x = self.reduction(self.norm(x)).view(B, N, H, W, 2, 2, self.fpn_dim)
        return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, N, 2 * H, 2 * W, self.fpn_dim)


class ConvMlp(nn.Module):
    """Fast-iTPN stage MLP on NCHW maps: 1×1 conv -> GELU -> LayerNorm over channels -> 1×1 conv."""

    def __init__(self, dim: int, hidden: int, norm_layer: NormLayer, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.ffn_ln = norm_layer(hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x = self.ffn_ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.drop(self.fc2(x))


class ConvMlpBlock(nn.Module):
    """Fast-iTPN stage block on NCHW maps: x + drop_path(ConvMlp(LayerNorm_channels(x)))."""

    def __init__(self, dim: int, mlp_ratio: float, norm_layer: NormLayer, drop_path: float = 0.0):
        super().__init__()
        self.norm2 = norm_layer(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), norm_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)))


class ConvPatchMerge(nn.Module):
    """Fast-iTPN merge on NCHW maps: LayerNorm over channels, then a 2×2 stride-2 conv to 2C."""

    def __init__(self, dim: int, norm_layer: NormLayer):
        super().__init__()
        self.norm = norm_layer(dim)
        self.reduction = nn.Conv2d(dim, dim * 2, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
