"""timm's classifier API on the iTPN and Fast-iTPN classifiers (``ITPN``, ``FastITPN``).

What timm's own tools and tests call: ``forward_features`` (images -> unpooled tokens as a map (B, h, w, D),
``output_fmt`` NHWC, as timm's hierarchical transformers), ``forward_head(x, pre_logits)``, ``reset_classifier``
/ ``get_classifier``, ``global_pool`` (``avg`` or ``''``: no pooling), ``forward_intermediates`` (the main
blocks' outputs, timm's signature), ``feature_info``, ``head_hidden_size``, ``group_matcher`` (the layer ids of
the engine's layer-wise lr decay, so ``timm.optim.create_optimizer_v2(model, layer_decay=d)`` gives the
engine's rates), ``load_pretrained`` (timm's ``custom_load`` hook: a file through our loading rule).

The host class provides ``forward_tokens(x, collect)`` -> (main-block tokens (B, N, D), [outputs of the
main blocks ``collect``], token grid or None for its own), ``final_norm(tokens)``, ``forward_head`` and the
backbone attributes (``embed_dim``, ``grid``, ``patch_size``, ``num_main_blocks``, ``num_stage_entries``,
``lr_layer_id``). Everything ``forward`` reaches compiles with TorchScript and traces with FX at the model's
size (``dynamic_img_size=False``).
"""

import logging
from typing import Callable

import torch
from timm.models._features import feature_take_indices
from torch import nn

from itpn_ds.models.loading import load_weights, read_checkpoint_file

log = logging.getLogger(__name__)

GLOBAL_POOLS = ("avg", "")


class TimmClassifier:
    """Mixin for a classifier ``nn.Module`` (see the module docstring). No class-level annotations: TorchScript
    would read them as the module's attribute types."""

    output_fmt = "NHWC"

    def init_classifier(self, num_classes: int, global_pool: str) -> None:
        """Register ``head`` (Linear D -> num_classes, Identity for 0) and the timm attributes."""
        self.head_hidden_size = self.embed_dim
        self.feature_info = [dict(num_chs=self.embed_dim, reduction=self.patch_size,
                                  module=f"blocks.{self.num_stage_entries + i}") for i in range(self.num_main_blocks)]
        self.reset_classifier(num_classes, global_pool)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new ``head`` for ``num_classes`` (0: none, ``forward`` returns the pooled features), and the
        pooling when given (``avg``, or ``''``: none, ``forward`` returns per-token outputs (B, h, w, ...))."""
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) -> (B, D) mean over the tokens (``global_pool='avg'``), or as is (``''``)."""
        return x.mean(dim=(1, 2)) if self.global_pool == "avg" else x

    def to_map(self, tokens: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        """Tokens (B, h·w, D) row-major -> (B, h, w, D) for the token ``grid`` (None: the model's own)."""
        h, w = (self.grid, self.grid) if grid is None else grid
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> unpooled tokens (B, H/16, W/16, D) (NHWC)."""
        tokens, _, grid = self.forward_tokens(x)
        return self.to_map(self.final_norm(tokens), grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature API: the outputs of the main blocks ``indices`` (None: all; an int n: the last n) as
        maps (B, D, h, w) (``output_fmt`` NCHW) or (B, h, w, D) (NHWC), with the final token norm where the
        model has one and ``norm``; and, unless ``intermediates_only``, the ``forward_features`` output first.
        ``stop_early`` is accepted (the blocks after the last index run anyway; the outputs are the same)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be NCHW or NHWC, got {output_fmt!r}")
        take, _ = feature_take_indices(self.num_main_blocks, indices)
        tokens, collected, grid = self.forward_tokens(x, list(take))
        maps = [self.to_map(self.final_norm(t) if norm else t, grid) for t in collected]
        if output_fmt == "NCHW":
            maps = [m.permute(0, 3, 1, 2) for m in maps]
        if intermediates_only:
            return maps
        return self.to_map(self.final_norm(tokens), grid), maps

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """timm's parameter grouping for layer-wise lr decay: a parameter name -> its layer id, the
        engine's (``lr_layer_id``: embedding 0, one per block, merges sharing the block before, head last)."""
        return self.lr_layer_id

    def load_pretrained(self, path: str) -> None:
        """timm's ``custom_load`` hook (``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=PATH)``):
        an official ``.pth`` or our ``.safetensors`` through ``load_weights``; the report is logged."""
        report = load_weights(self, read_checkpoint_file(path))
        log.info("%s from %s: %s", type(self).__name__, path, report.summary())
