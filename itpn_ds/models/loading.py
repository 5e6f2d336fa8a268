"""One loading rule for every checkpoint source: official ``.pth`` files, our exports and our checkpoints.

Our parameter names equal the published ones, so there is no conversion table. After unwrapping
(``model`` / ``module`` / ``state_dict`` / ``model_ema`` keys, DDP's ``module.`` prefix) the checkpoint's
keys are sorted:

* a dense task model's checkpoint (segmentation, detection: the backbone under a prefix such as
  ``backbone.`` or ``backbone.body.``, found in front of ``patch_embed.proj.weight``) loaded into a backbone:
  the backbone's keys lose the prefix, the task heads' keys are dropped;
* pre-training only (``PRETRAIN_ONLY_PREFIXES``: pyramid, decoders, prediction heads, mask token) and absent
  from the model: dropped (``LoadReport.dropped``);
* the classification head, the prefixes a classifier class declares in ``head_prefixes`` (ITPN: ``head.``,
  ``fc_norm.``; FastITPN: ``head.``, ``norm.``). From a pre-training checkpoint the head stays at its
  initialisation (``fresh``) and the checkpoint's keys under those prefixes are dropped (a pre-training
  ``norm.`` is the fused-pyramid norm, not FastITPN's final norm). From a classification checkpoint the head
  loads, except ``head.*`` trained for another number of classes, or for other classes (``new_head``: the
  caller compared the class maps), which stays at init (``reinitialised``);
  a model without those parts (a dense backbone) drops them;
* the pyramid of a dense backbone (its class's ``fresh_when_absent`` prefixes) where the checkpoint has none
  (a classifier) or fewer blocks (CLIP pre-training has ``fpn_depth`` 1, the segmentation layout 2): at init
  (``fresh``);
* relative-position bias tables the checkpoint has none of (pixel pre-training has no RPE): at init, zeros,
  as the published pixel fine-tuning leaves them (``fresh``);
* position embeddings and relative-position bias tables trained at another resolution: resized bicubically
  to the model's grid, each head's table over its (2g-1)×(2g-1) offsets (``resized``);
  ``relative_position_index`` is always the model's own buffer;
* everything else must match one to one: a key on one side only or a shape mismatch raises
  ``CheckpointMismatchError`` naming the keys and the fix (e.g. the layer-scale setting).
"""
from __future__ import annotations

import argparse
import errno
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from itpn_ds.errors import UserError
from itpn_ds.models.layers import resample_grid
from itpn_ds.models.pyramid import PYRAMID_PREFIXES

WRAPPER_KEYS = ("model", "module", "state_dict", "model_ema")
POS_EMBED_KEYS = ("absolute_pos_embed", "pos_embed")
RPE_TABLE = "relative_position_bias_table"
RPE_INDEX = "relative_position_index"
LAYER_SCALE = ("gamma_1", "gamma_2")
CLASS_HEAD = "head."  # the classifier's last Linear: the only head part whose shape follows the class count
PRETRAIN_ONLY_PREFIXES = ("mask_token", "lm_head", "lm_cls_head", "norm.", "norm_cls", "cls_pt_layers",
                          "decoder_", *PYRAMID_PREFIXES)
BACKBONE_ANCHOR = "patch_embed.proj.weight"  # every backbone has it; a task model has it under its backbone


@dataclass
class LoadReport:
    """What loading did with each key (checkpoint keys for ``dropped``, model keys for the rest)."""

    loaded: list[str] = field(default_factory=list)         # model keys set from the checkpoint (resized included)
    dropped: list[str] = field(default_factory=list)        # checkpoint keys of pre-training-only parts, not used
    fresh: list[str] = field(default_factory=list)          # model keys the checkpoint has no counterpart for: at init
    reinitialised: list[str] = field(default_factory=list)  # head keys trained for another class count: at init
    resized: list[str] = field(default_factory=list)        # keys interpolated to the model's grid

    def summary(self) -> str:
        """One log line: counts, and the keys of every category but ``loaded``."""
        parts = [f"{len(self.loaded)} tensors loaded"]
        for name in ("resized", "fresh", "reinitialised", "dropped"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name} {len(keys)}: {name_keys(keys)}")
        return "; ".join(parts)


class CheckpointMismatchError(UserError, RuntimeError):
    """The state dict does not fit the model (missing or unexpected keys, incompatible shapes)."""


def name_keys(keys: Iterable[str], limit: int = 6) -> str:
    """``a, b, c`` or ``a, b, ... (+N more)``: key lists short enough for one line."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown}, ... (+{len(keys) - limit} more)"


def unwrap_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """Find the tensors in a checkpoint wrapped as official files are, and strip DDP's ``module.`` prefix."""
    sd = obj
    while isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next((sd[k] for k in WRAPPER_KEYS if k in sd), None)
        if inner is None:
            raise CheckpointMismatchError(f"no state dict found in checkpoint with keys {sorted(sd)[:10]}")
        sd = inner
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def resize_grid(values: torch.Tensor, side: int) -> torch.Tensor:
    """(n², C) values on an n×n grid -> (side², C), bicubic (align_corners=False), computed in fp32."""
    n = math.isqrt(values.shape[0])
    if n * n != values.shape[0]:
        raise CheckpointMismatchError(f"a table of {values.shape[0]} rows is not a square grid")
    return resample_grid(values, (n, n), (side, side))


def resize_pos_embed(pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(1, n², D) -> (1, num_tokens, D): the absolute position embedding resampled on its token grid."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise CheckpointMismatchError(f"position embedding of {num_tokens} tokens is not a square grid")
    return resize_grid(pos[0], side)[None]


def resize_rpe_table(table: torch.Tensor, num_offsets: int) -> torch.Tensor:
    """((2g-1)², heads) -> (num_offsets, heads): each head's bias over the (2g-1)×(2g-1) relative offsets
    resampled to the model's (2g'-1)×(2g'-1) offsets, num_offsets = (2g'-1)²."""
    side = math.isqrt(num_offsets)
    if side * side != num_offsets:
        raise CheckpointMismatchError(f"relative-position table of {num_offsets} offsets is not a square grid")
    return resize_grid(table, side)


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the model's classification head (its class's ``head_prefixes``); () if it has none."""
    return tuple(getattr(model, "head_prefixes", ()))


def is_pretraining_checkpoint(sd: Mapping[str, torch.Tensor], heads: tuple[str, ...]) -> bool:
    """A checkpoint with any pre-training-only part (outside the classifier's head prefixes)."""
    return any(k.startswith(PRETRAIN_ONLY_PREFIXES) and not k.startswith(heads) for k in sd)


def load_weights(model: nn.Module, state_dict: Mapping, strict: bool = False, new_head: bool = False) -> LoadReport:
    """Load ``state_dict`` (official, exported or consolidated from our checkpoints) into ``model`` by the
    rule of the module docstring; ``new_head``: a classifier's ``head.*`` stays at init whatever its shape (the
    checkpoint was trained on other classes).

    ``strict``: every model key must come from the checkpoint (nothing ``fresh`` or ``reinitialised``), as
    evaluation needs. Raises ``CheckpointMismatchError`` naming the keys and the fix.
    """
    full, report = fit_state_dict(model, state_dict, strict, new_head)
    model.load_state_dict(full)
    return report


def fit_state_dict(model: nn.Module, state_dict: Mapping, strict: bool = False, new_head: bool = False
                   ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The rule without the loading: (a state dict with every key of ``model``, the checkpoint's tensors
    sorted and resized by the rule and the model's own values where it leaves keys at init, the report).
    timm's ``pretrained_filter_fn`` (``itpn_ds.models.registry.checkpoint_filter_fn``) returns it."""
    sd = {k: v for k, v in unwrap_state_dict(state_dict).items() if not k.endswith(RPE_INDEX)}
    own = {k: v for k, v in model.state_dict().items() if not k.endswith(RPE_INDEX)}
    sd, task_keys = backbone_of_task_checkpoint(sd, own)
    report = sort_keys(sd, own, head_prefixes(model), tuple(getattr(model, "fresh_when_absent", ())), new_head)
    for k in report.dropped + report.reinitialised:
        del sd[k]
    report.dropped = sorted(report.dropped + task_keys)
    report.resized = resize_to_model(sd, own)
    check_fit(model, sd, own, report, strict)
    report.loaded = sorted(sd)
    return {**model.state_dict(), **sd}, report


def load_target(model: nn.Module, state_dict: Mapping) -> nn.Module:
    """The module ``state_dict`` loads into: a dense task model (``DenseTaskModel``) takes a checkpoint of its
    own kind whole and anything else (pre-training, classifier, another task) into its backbone."""
    if hasattr(model, "dense_backbone") and model.backbone_prefix + BACKBONE_ANCHOR not in unwrap_state_dict(state_dict):
        return model.dense_backbone
    return model


def backbone_of_task_checkpoint(sd: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]
                                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A task model's checkpoint into a bare backbone: (the backbone's tensors without the task model's
    prefix, the task heads' keys); any other checkpoint: (``sd``, [])."""
    prefix = next((k[:-len(BACKBONE_ANCHOR)] for k in sorted(sd, key=len) if k.endswith("." + BACKBONE_ANCHOR)), None)
    if prefix is None or BACKBONE_ANCHOR not in own or BACKBONE_ANCHOR in sd:
        return sd, []
    backbone = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return backbone, sorted(k for k in sd if not k.startswith(prefix))


def sort_keys(sd: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], heads: tuple[str, ...],
              fresh_when_absent: tuple[str, ...] = (), new_head: bool = False) -> LoadReport:
    """The report's ``dropped`` (checkpoint keys), ``fresh`` and ``reinitialised`` (model keys) by the rule."""
    from_pretraining = is_pretraining_checkpoint(sd, heads)
    report = LoadReport()
    report.dropped = sorted(k for k in sd if (k not in own and k.startswith(PRETRAIN_ONLY_PREFIXES + heads))
                            or (from_pretraining and k.startswith(heads)))
    if from_pretraining:
        report.fresh = sorted(k for k in own if k.startswith(heads))
    else:
        report.reinitialised = sorted(k for k in own if k.startswith(heads) and k.startswith(CLASS_HEAD)
                                      and k in sd and (new_head or sd[k].shape != own[k].shape))
    if not any(k.endswith(RPE_TABLE) for k in sd):
        report.fresh += sorted(k for k in own if k.endswith(RPE_TABLE))
    if fresh_when_absent:
        report.fresh += sorted(k for k in own if k not in sd and k.startswith(fresh_when_absent))
    return report


def resize_to_model(sd: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> list[str]:
    """Resample, in place, the checkpoint's position embeddings and relative-position bias tables trained at
    another grid (the same number of heads); -> their keys."""
    resized = []
    for k in sorted(set(sd) & set(own)):
        if sd[k].shape == own[k].shape:
            continue
        if k in POS_EMBED_KEYS:
            sd[k] = resize_pos_embed(sd[k], own[k].shape[1])
        elif k.endswith(RPE_TABLE) and sd[k].shape[1] == own[k].shape[1]:
            sd[k] = resize_rpe_table(sd[k], own[k].shape[0])
        else:
            continue
        resized.append(k)
    return resized


def check_fit(model: nn.Module, sd: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], report: LoadReport,
              strict: bool) -> None:
    """Raise ``CheckpointMismatchError`` unless ``sd`` covers ``own`` one to one, the report's fresh and
    reinitialised keys excepted (``strict`` allows none of those either)."""
    missing = sorted(set(own) - set(sd) - set(report.fresh) - set(report.reinitialised))
    unexpected = sorted(set(sd) - set(own))
    wrong_shape = sorted(k for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint keys the model lacks ({name_keys(unexpected)})")
    if missing:
        problems.append(f"{len(missing)} model keys the checkpoint lacks ({name_keys(missing)})")
    if wrong_shape:
        problems.append("shape mismatches " + ", ".join(
            f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_shape[:4]))
    if problems:
        raise CheckpointMismatchError(f"checkpoint does not fit {type(model).__name__}: {'; '.join(problems)}; "
                                      f"fix: {mismatch_fix(missing, unexpected)}")
    at_init = report.fresh + report.reinitialised
    if strict and at_init:
        raise CheckpointMismatchError(
            f"checkpoint leaves {len(at_init)} keys of {type(model).__name__} at their initialisation "
            f"({name_keys(at_init)}); give a checkpoint of this classifier (a fine-tuning run or its export)")


def mismatch_fix(missing: list[str], unexpected: list[str]) -> str:
    """The model setting that makes the model match the checkpoint, for the mismatches we can name."""
    def has(keys: list[str], suffixes: tuple[str, ...]) -> bool:
        return any(k.endswith(suffixes) for k in keys)

    if has(unexpected, LAYER_SCALE) and not has(missing, LAYER_SCALE):
        return "the checkpoint has layer scale (gamma_*): add model.kwargs.init_values=0.1"
    if has(missing, LAYER_SCALE) and not has(unexpected, LAYER_SCALE):
        return "the checkpoint has no layer scale: model.kwargs.init_values=0"
    if has(unexpected, (RPE_TABLE,)):
        return "the checkpoint has relative-position bias tables: model.kwargs.rpe=true"
    return "build the model the checkpoint was trained as (model.name and model.kwargs: dims, depths, heads)"


def read_checkpoint_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an official ``.pth`` (torch pickle, loaded with weights_only) or our ``.safetensors`` export."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "checkpoint file not found", str(path))
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise CheckpointMismatchError(f"cannot read {path} (truncated or not a safetensors file: {exc}); "
                                          "export it again") from exc
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # a truncated or foreign file: say which
        raise CheckpointMismatchError(f"cannot read checkpoint {path} (truncated or not a torch checkpoint: "
                                      f"{str(exc).splitlines()[0][:200]})") from exc

