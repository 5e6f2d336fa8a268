"""iTPN classifier (fine-tuning) and dense backbone (pyramid outputs for detection / segmentation)."""
from __future__ import annotations

import torch
from torch import nn

from itpn_ds.models.hivit import HiViT
from itpn_ds.models.layers import check_image_batch
from itpn_ds.models.pyramid import tokens_to_map


class ITPN(HiViT):
    """``num_outs`` = 1: classifier (mean pool -> ``fc_norm`` -> ``head``); > 1: dense backbone with a pyramid."""

    head_prefixes = ("head.", "fc_norm.")  # new parts when fine-tuning from pre-training (models/loading.py)

    def __init__(self, num_classes: int = 1000, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        if self.num_outs == 1:
            self.fc_norm = self.norm_layer(self.embed_dim)
            self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> main-block tokens (B, N, D), N = (H/16)²."""
        tokens, _ = self.forward_stages(x)
        tokens = self.add_position(tokens, x.shape[-1] // self.patch_size)
        return self.forward_main(tokens, self.rpe_index())[0]

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N, D) -> logits (B, num_classes), or pooled features (B, D) with ``pre_logits``."""
        pooled = self.fc_norm(tokens.mean(dim=1))
        return pooled if pre_logits else self.head(pooled)

    def check_input(self, x: torch.Tensor) -> None:
        """The classifier takes square images at its size; the pyramid maps take any multiple of 16 px."""
        if self.num_outs == 1:
            super().check_input(x)
        else:
            check_image_batch(x, self.patch_embed.proj.in_channels, self.patch_size, "patch size")

    def forward_pyramid_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W), sides multiples of 16 -> pyramid maps, finest last: (B, F, H/16·s, W/16·s),
        s = 1, 2, 4 (``itpn_ds.models.dense`` builds the published dense layouts on these)."""
        if self.num_outs == 1:
            raise ValueError("this ITPN was built as a classifier (num_outs=1); build it with num_outs>1 for pyramid outputs")
        tokens, features, grid = self.forward_pyramid_inputs(x)
        return [tokens_to_map(level, grid) for level in self.forward_pyramid(tokens, features)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
