"""iTPN pre-training against CLIP targets (masked image modeling with a feature pyramid).

``ClipDistillHeads`` holds what every CLIP-distillation model adds to a backbone with a pyramid, whatever its
family (``ITPNClipDistill`` here on HiViT, ``FastITPNClipDistill`` on Fast-iTPN): the mask token, the fused main
head and the auxiliary head.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from timm.layers import trunc_normal_

from itpn_ds.models.hivit import HiViT, drop_path_rates
from itpn_ds.models.layers import NormLayer, attention_block

NUM_AUX_BLOCKS = 2


class ClipDistillHeads:
    """Mixin: the mask token and the two heads, registered on the model under the published names.

    main: pyramid levels -> ``decoder_embed`` (LayerNorm + Linear to D/4^level, reshaped to D) summed
          -> ``norm`` -> ``lm_head``.
    aux:  output of main block int(0.75·depth) -> two ``cls_pt_layers`` -> ``norm_cls`` -> ``lm_cls_head``.
    Both are (B, N, teacher_dim) and are supervised on all tokens. The host model provides ``embed_dim``,
    ``depth``, the pyramid (``fpn_dim``, ``num_outs``) and ``run_block`` (``GradCheckpointing``).
    """

    embed_dim: int
    depth: int
    fpn_dim: int
    num_outs: int
    run_block: Callable[..., torch.Tensor]

    def build_distill_heads(self, teacher_dim: int, norm: NormLayer, aux_block: Callable[[float], nn.Module],
                            num_stage_blocks: int, drop_path_rate: float) -> None:
        """Register the heads; ``aux_block(drop_path)`` builds one auxiliary block of the model's family.

        The auxiliary blocks continue the backbone's stochastic-depth schedule (over ``num_stage_blocks`` early
        blocks + ``depth`` main blocks) from main block int(0.75·depth), clamped to its last rate.
        """
        D, fpn_dim = self.embed_dim, self.fpn_dim
        self.aux_block_index = int(0.75 * self.depth)
        self.decoder_embed = nn.ModuleList(
            nn.Sequential(norm(fpn_dim), nn.Linear(fpn_dim, D // 4 ** level)) for level in range(self.num_outs))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.lm_head = nn.Linear(D, teacher_dim)
        self.lm_cls_head = nn.Linear(D, teacher_dim)
        self.norm = norm(D)
        self.norm_cls = norm(D)
        dpr = drop_path_rates(num_stage_blocks + self.depth, drop_path_rate)
        first = num_stage_blocks + self.aux_block_index
        self.cls_pt_layers = nn.ModuleList(aux_block(dpr[min(first + i, len(dpr) - 1)]) for i in range(NUM_AUX_BLOCKS))

    def init_mask_token(self) -> None:
        trunc_normal_(self.mask_token, std=0.02)

    def mask_patches(self, tokens: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) with the masked ones (``bool_masked_pos`` (B, N), True = masked) replaced by
        ``mask_token``."""
        if bool_masked_pos.shape != tokens.shape[:2]:
            raise ValueError(f"bool_masked_pos must be (B, N) = {tuple(tokens.shape[:2])}, "
                             f"got {tuple(bool_masked_pos.shape)}")
        w = bool_masked_pos.unsqueeze(-1).to(tokens.dtype)
        return tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w

    def forward_aux(self, aux: torch.Tensor, *block_args) -> torch.Tensor:
        """The auxiliary blocks on the captured main-block tokens (B, N, D); ``block_args`` go to each block."""
        for i, blk in enumerate(self.cls_pt_layers):
            aux = self.run_block(i, blk, aux, *block_args)
        return aux

    def predict(self, levels: list[torch.Tensor], aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pyramid levels [(B, N, s, s, F)] and aux tokens (B, N, D) -> (main, aux), each (B, N, teacher_dim)."""
        B, N = aux.shape[:2]
        fused = sum(embed(level).reshape(B, N, -1) for embed, level in zip(self.decoder_embed, levels))
        return self.lm_head(self.norm(fused)), self.lm_cls_head(self.norm_cls(aux))


class ITPNClipDistill(ClipDistillHeads, HiViT):
    """HiViT + pyramid + the CLIP-distillation heads; the mask token replaces masked patches after the second
    merge. The auxiliary blocks are iTPN attention blocks (with the relative-position bias)."""

    def __init__(self, teacher_dim: int = 768, num_outs: int = 3, drop_path_rate: float = 0.0,
                 init_values: float | None = 0.1, **kwargs):
        super().__init__(num_outs=num_outs, drop_path_rate=drop_path_rate, init_values=init_values, **kwargs)
        if num_outs < 2:
            raise ValueError("ITPNClipDistill needs the pyramid: num_outs must be 2 or 3")
        D = self.embed_dim
        num_heads = self.main_blocks[0].attn.num_heads
        mlp_ratio = self.main_blocks[0].mlp.fc1.out_features / D
        rpe_grid = self.grid if self.rpe else None

        def aux_block(drop_path: float) -> nn.Module:  # nn.LayerNorm (eps 1e-5), as the published code builds it
            return attention_block(D, num_heads, mlp_ratio, nn.LayerNorm, rpe_grid=rpe_grid, init_values=init_values,
                                   drop_path=drop_path)

        self.build_distill_heads(teacher_dim, self.norm_layer, aux_block, len(self.stage_blocks) - 2, drop_path_rate)
        self.init_weights()
        self.init_mask_token()

    def forward_features(self, x: torch.Tensor, bool_masked_pos: torch.Tensor
                         ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """-> (pyramid levels [(B, N, s, s, F)], aux tokens (B, N, D)); masked patches get ``mask_token``."""
        tokens, features = self.forward_stages(x)
        tokens = self.mask_patches(tokens, bool_masked_pos)
        rpe_index = self.rpe_index()
        tokens, [aux] = self.forward_main(self.add_position(tokens), rpe_index, collect=[self.aux_block_index])
        return self.forward_pyramid(tokens, features), self.forward_aux(aux, rpe_index)

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W), mask (B, N) bool -> (main, aux) predictions, each (B, N, teacher_dim)."""
        return self.predict(*self.forward_features(x, bool_masked_pos))
