"""iTPN pre-training against CLIP targets (masked image modeling with a feature pyramid)."""
from __future__ import annotations

import torch
from torch import nn
from timm.layers import trunc_normal_

from itpn_ds.models.hivit import HiViT, drop_path_rates
from itpn_ds.models.layers import attention_block


class ITPNClipDistill(HiViT):
    """Backbone + pyramid fused into a main head, plus an auxiliary head from the main blocks.

    main: pyramid levels -> ``decoder_embed`` (LayerNorm + Linear to D/4^level, reshaped to D) summed
          -> ``norm`` -> ``lm_head``.
    aux:  output of main block int(0.75·depth) -> two ``cls_pt_layers`` -> ``norm_cls`` -> ``lm_cls_head``.
    Both are (B, N, teacher_dim) and are supervised on all tokens.
    """

    def __init__(self, teacher_dim: int = 768, num_outs: int = 3, drop_path_rate: float = 0.0,
                 init_values: float | None = 0.1, **kwargs):
        super().__init__(num_outs=num_outs, drop_path_rate=drop_path_rate, init_values=init_values, **kwargs)
        if num_outs < 2:
            raise ValueError("ITPNClipDistill needs the pyramid: num_outs must be 2 or 3")
        D, fpn_dim = self.embed_dim, self.fpn_dim
        self.aux_block_index = int(0.75 * self.depth)
        self.decoder_embed = nn.ModuleList(
            nn.Sequential(self.norm_layer(fpn_dim), nn.Linear(fpn_dim, D // 4 ** level)) for level in range(num_outs))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.lm_head = nn.Linear(D, teacher_dim)
        self.lm_cls_head = nn.Linear(D, teacher_dim)
        self.norm = self.norm_layer(D)
        self.norm_cls = self.norm_layer(D)
        num_heads = self.main_blocks[0].attn.num_heads
        mlp_ratio = self.main_blocks[0].mlp.fc1.out_features / D
        stage_count = len(self.stage_blocks) - 2
        dpr = drop_path_rates(stage_count + self.depth, drop_path_rate)
        self.cls_pt_layers = nn.ModuleList(
            attention_block(D, num_heads, mlp_ratio, nn.LayerNorm, rpe_grid=self.grid if self.rpe else None,
                            init_values=init_values,
                            drop_path=dpr[min(stage_count + self.aux_block_index + i, len(dpr) - 1)])
            for i in range(2))
        self.init_weights()
        trunc_normal_(self.mask_token, std=0.02)

    def check_mask(self, bool_masked_pos: torch.Tensor, batch: int, num_patches: int) -> None:
        if bool_masked_pos.shape != (batch, num_patches):
            raise ValueError(f"bool_masked_pos must be (B, N) = ({batch}, {num_patches}), "
                             f"got {tuple(bool_masked_pos.shape)}")

    def forward_features(self, x: torch.Tensor, bool_masked_pos: torch.Tensor
                         ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """-> (pyramid levels [(B, N, s, s, F)], aux tokens (B, N, D)); masked patches get ``mask_token``."""
        grid = x.shape[-1] // self.patch_size
        tokens, features = self.forward_stages(x)
        self.check_mask(bool_masked_pos, tokens.shape[0], tokens.shape[1])
        w = bool_masked_pos.unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w
        rpe_index = self.rpe_index()
        tokens, aux = self.forward_main(self.add_position(tokens, grid), rpe_index, self.aux_block_index)
        for i, blk in enumerate(self.cls_pt_layers):
            aux = self.run_block(i, blk, aux, rpe_index)
        return self.forward_pyramid(tokens, features), aux

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W), mask (B, N) bool -> (main, aux) predictions, each (B, N, teacher_dim)."""
        levels, aux = self.forward_features(x, bool_masked_pos)
        B, N = aux.shape[:2]
        fused = sum(embed(level).reshape(B, N, -1) for embed, level in zip(self.decoder_embed, levels))
        return self.lm_head(self.norm(fused)), self.lm_cls_head(self.norm_cls(aux))
