"""A small CLIP with seeded random weights, saved in OpenAI's state-dict format.

It exercises every stage of the teacher path (loading, extraction, cache, replay) where no real CLIP
checkpoint is at hand — tests and `make demo`. Its targets carry no semantics: for real pre-training point
the tools at OpenAI's ViT-L-14.pt.
"""
from __future__ import annotations

from pathlib import Path

import torch


def write_random_clip_checkpoint(path: str | Path, resolution: int = 56, width: int = 64, layers: int = 2,
                                 patch: int = 14, embed_dim: int = 32, seed: int = 0) -> Path:
    """Save a random-initialized open_clip CLIP (vision ``resolution`` px / ``patch``, target dim ``embed_dim``)
    as an OpenAI-format state dict with fp16-exact float32 weights (as OpenAI's releases are fp16)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(embed_dim, CLIPVisionCfg(layers=layers, width=width, patch_size=patch, image_size=resolution),
                 CLIPTextCfg(context_length=8, vocab_size=64, width=64, heads=1, layers=1), quick_gelu=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half().float() for k, v in model.state_dict().items()}, path)
    return path
