"""Load official iTPN checkpoints (and our exports) into our models.

Our parameter names equal the published ones, so loading is a strict ``load_state_dict`` after three
adaptations: unwrapping (``model`` / ``module`` / ``state_dict`` keys, ``module.`` prefixes), dropping the
pre-training-only keys when the target is a classifier, and resizing absolute position embeddings
(bicubic) when the checkpoint was trained at another resolution.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("model", "module", "state_dict", "model_ema")
POS_EMBED_KEYS = ("absolute_pos_embed", "pos_embed")
PRETRAIN_ONLY_PREFIXES = ("mask_token", "lm_head", "lm_cls_head", "norm.", "norm_cls", "cls_pt_layers",
                          "decoder_", "fpn_modules", "align_dim_", "split_", "block_16to8", "block_8to4")


@dataclass
class LoadReport:
    """What ``load_official_state_dict`` changed on the way in."""

    dropped: list[str] = field(default_factory=list)   # pre-training-only keys not used by a classifier
    resized: list[str] = field(default_factory=list)   # position embeddings resized to the model's grid


class CheckpointMismatchError(RuntimeError):
    """The state dict does not fit the model (missing or unexpected keys, incompatible shapes)."""


def unwrap_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """Find the tensors in a checkpoint wrapped as official files are, and strip DDP's ``module.`` prefix."""
    sd = obj
    while isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next((sd[k] for k in WRAPPER_KEYS if k in sd), None)
        if inner is None:
            raise CheckpointMismatchError(f"no state dict found in checkpoint with keys {sorted(sd)[:10]}")
        sd = inner
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def resize_pos_embed(pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(1, n², D) -> (1, num_tokens, D) by bicubic interpolation on the n×n grid."""
    n, m = math.isqrt(pos.shape[1]), math.isqrt(num_tokens)
    if n * n != pos.shape[1] or m * m != num_tokens:
        raise CheckpointMismatchError(f"position embedding of {pos.shape[1]} tokens is not a square grid")
    grid = pos.reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(m, m), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, m * m, -1).to(pos.dtype)


def is_classifier(model: nn.Module) -> bool:
    return hasattr(model, "head") and not hasattr(model, "lm_head")


def load_official_state_dict(model: nn.Module, state_dict: Mapping) -> LoadReport:
    """Strictly load an official (or our) state dict into ``model``; see the module docstring.

    Raises ``CheckpointMismatchError`` naming every missing and unexpected key.
    """
    sd = unwrap_state_dict(state_dict)
    report = LoadReport()
    own = model.state_dict()
    if is_classifier(model):
        report.dropped = sorted(k for k in sd if k not in own and k.startswith(PRETRAIN_ONLY_PREFIXES))
        for k in report.dropped:
            del sd[k]
        if report.dropped:
            log.warning("dropped %d pre-training-only keys for a classifier: %s", len(report.dropped),
                        ", ".join(report.dropped[:8]) + (" ..." if len(report.dropped) > 8 else ""))
    for key in POS_EMBED_KEYS:
        if key in sd and key in own and sd[key].shape != own[key].shape:
            sd[key] = resize_pos_embed(sd[key], own[key].shape[1])
            report.resized.append(key)
    if "relative_position_index" in own and "relative_position_index" in sd \
            and sd["relative_position_index"].shape != own["relative_position_index"].shape:
        raise CheckpointMismatchError("relative position bias was trained at another resolution: rebuild the "
                                      "model with the checkpoint's img_size")
    missing = sorted(set(own) - set(sd) - {"relative_position_index"})
    unexpected = sorted(set(sd) - set(own))
    wrong_shape = sorted(k for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or wrong_shape:
        raise CheckpointMismatchError(
            f"checkpoint does not fit {type(model).__name__}: missing keys {missing}, unexpected keys {unexpected}, "
            f"shape mismatches {[(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in wrong_shape]}")
    model.load_state_dict(sd, strict=False)
    return report


def read_checkpoint_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an official ``.pth`` (torch pickle, loaded with weights_only) or our ``.safetensors`` export."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # a truncated or foreign file: say which
        raise CheckpointMismatchError(f"cannot read checkpoint {path}: {exc}") from exc


def export_metadata(path: str | Path) -> dict | None:
    """The JSON metadata written beside an exported safetensors file (``<name>.json``), if any."""
    meta = Path(path).with_suffix(".json")
    return json.loads(meta.read_text()) if meta.is_file() else None
