"""A small CLIP with seeded random weights, saved as an OpenAI-format state dict or an open_clip checkpoint.

It exercises every stage of the teacher path (loading, extraction, cache, replay) where no real CLIP
checkpoint is at hand — tests and `make demo`. Its targets carry no semantics: for real pre-training point
the tools at OpenAI's ViT-L-14.pt.

Both writers build the same model from ``random_clip_config`` and the seed, with fp16-exact weights (as
OpenAI's releases are fp16), so the two files give the same targets through their two loading routes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def random_clip_config(resolution: int = 56, width: int = 64, layers: int = 2, patch: int = 14,
                       embed_dim: int = 32) -> dict[str, Any]:
    """open_clip model config of the small CLIP: vision ``resolution`` px / ``patch``, ``width`` x ``layers``,
    target dim ``embed_dim``; a 1-layer text tower of width 64 (the shapes OpenAI's loader infers back)."""
    return {"embed_dim": embed_dim, "quick_gelu": True,
            "vision_cfg": {"image_size": resolution, "layers": layers, "width": width, "patch_size": patch},
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1}}


def random_clip_state_dict(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """State dict of ``open_clip.model.CLIP(**config)`` initialized from ``seed``, rounded through fp16."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(**config)
    return {k: v.half().float() for k, v in model.state_dict().items()}


def write_random_clip_checkpoint(path: str | Path, resolution: int = 56, width: int = 64, layers: int = 2,
                                 patch: int = 14, embed_dim: int = 32, seed: int = 0) -> Path:
    """Save the small CLIP as an OpenAI-format state dict (``load_clip_teacher(path)`` reads it)."""
    config = random_clip_config(resolution, width, layers, patch, embed_dim)
    path = _prepare(path)
    torch.save(random_clip_state_dict(config, seed), path)
    return path


def write_random_open_clip_checkpoint(path: str | Path, config_path: str | Path, resolution: int = 56,
                                      width: int = 64, layers: int = 2, patch: int = 14, embed_dim: int = 32,
                                      seed: int = 0) -> tuple[Path, Path]:
    """Save the small CLIP as open_clip training saves it (``{"epoch", "state_dict": {"module.<name>": ...}}``)
    plus its model-config JSON; returns (checkpoint, config). ``load_clip_teacher(checkpoint, arch=config)``."""
    config = random_clip_config(resolution, width, layers, patch, embed_dim)
    config_path = _prepare(config_path)
    config_path.write_text(json.dumps({"model_cfg": config}, indent=1))
    state = {f"module.{k}": v for k, v in random_clip_state_dict(config, seed).items()}
    path = _prepare(path)
    torch.save({"epoch": 1, "name": config_path.stem, "state_dict": state}, path)
    return path, config_path


def _prepare(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
