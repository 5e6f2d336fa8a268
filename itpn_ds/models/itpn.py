"""iTPN classifier (fine-tuning) and dense backbone (pyramid outputs for detection / segmentation)."""
from __future__ import annotations

import torch
from torch import nn

from itpn_ds.models.classifier import TimmClassifier
from itpn_ds.models.hivit import HiViT
from itpn_ds.models.layers import check_image_batch
from itpn_ds.models.pyramid import tokens_to_map


class ITPN(TimmClassifier, HiViT):
    """``num_outs`` = 1: classifier (mean pool -> ``fc_norm`` -> ``head``, timm's classifier API:
    ``TimmClassifier``); > 1: dense backbone with a pyramid (``forward_pyramid_maps``)."""

    head_prefixes = ("head.", "fc_norm.")  # new parts when fine-tuning from pre-training (models/loading.py)

    def __init__(self, num_classes: int = 1000, global_pool: str = "avg", **kwargs):
        super().__init__(**kwargs)
        if self.num_outs == 1:
            self.fc_norm = self.norm_layer(self.embed_dim)
            self.init_classifier(num_classes, global_pool)
        else:
            self.num_classes = num_classes
        self.init_weights()

    def forward_tokens(self, x: torch.Tensor, collect: list[int] | None = None
                       ) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int] | None]:
        """Images -> (main-block tokens (B, N, D), [outputs of main blocks ``collect``], token grid or None)."""
        grid = self.token_grid(x)
        tokens, _ = self.forward_stages(x)
        tokens, collected = self.forward_main(self.add_position(tokens, grid), self.rpe_index(grid), grid, collect)
        return tokens, collected, grid

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """iTPN has no norm on the tokens: its ``fc_norm`` follows the pooling (``forward_head``)."""
        return tokens

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, h, w, D) -> logits (B, num_classes), or the normed pooled features (B, D) with
        ``pre_logits`` (``global_pool=''``: per token, (B, h, w, ...))."""
        x = self.fc_norm(self.pool(x))
        return x if pre_logits else self.head(x)

    def check_image_size(self, x: torch.Tensor) -> None:
        """The classifier takes square images at its size; the pyramid maps take any multiple of 16 px."""
        if self.num_outs == 1:
            super().check_image_size(x)
        else:
            check_image_batch(x, self.patch_embed.proj.in_channels, self.patch_size, "patch size")

    def forward_pyramid_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W), sides multiples of 16 -> pyramid maps, finest last: (B, F, H/16·s, W/16·s),
        s = 1, 2, 4 (``itpn_ds.models.dense`` builds the published dense layouts on these)."""
        if self.num_outs == 1:
            raise ValueError("this ITPN was built as a classifier (num_outs=1); build it with num_outs>1 for pyramid outputs")
        tokens, features, grid = self.forward_pyramid_inputs(x)
        return [tokens_to_map(level, grid) for level in self.forward_pyramid(tokens, features)]
