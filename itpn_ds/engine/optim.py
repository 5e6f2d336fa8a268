"""Parameter groups and the optimizer.

Groups: weight decay off for 1-d tensors (norm weights, biases), layer-scale gammas and whatever the model
lists in ``no_weight_decay()`` (position embeddings, relative-position bias tables, tokens); with layer-wise
lr decay (fine-tuning) one group per (layer, decay) pair, layer ids from the model's ``lr_layer_id(name)``
(dense task models answer for their backbone by its rule and put every head in the last layer:
``itpn_ds.models.dense.DenseTaskModel``).
Each group carries ``lr_scale`` and ``wd_scale``, which the schedule multiplies in every step.

Optimizer (``optim.optimizer``, ``auto`` by :func:`choose_optimizer`):

* ``adamw_fused``: PyTorch's own ``AdamW(fused=True)``, one kernel per parameter group, prebuilt in the torch
  wheel (no compiler on the compute nodes); ``auto``'s choice on CUDA. DeepSpeed takes it as a client
  optimizer (type ``torch.optim.AdamW``, which ZeRO supports) and steps it on its fp32 master weights.
* ``fused_adam``: DeepSpeed's FusedAdam, JIT-compiled on first use, which needs the CUDA compiler ``nvcc``
  on every node (cached in ``TORCH_EXTENSIONS_DIR`` afterwards); CUDA only, never chosen by ``auto``.
* ``cpu_adam``: DeepSpeedCPUAdam, ``auto``'s choice (and the only one allowed) when ZeRO offloads the
  optimizer to the CPU.
* ``adamw``: torch AdamW (for-each implementation); ``auto``'s choice on the CPU.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from itpn_ds.config import ConfigError, OptimConfig


def param_groups(model: nn.Module, layer_decay: float = 1.0, layer_decay_depth: int = 0, rule: str = "model",
                 num_layers: int = 0) -> list[dict[str, Any]]:
    """AdamW groups for ``model``: [{"params", "lr_scale", "wd_scale", "name"}], no empty groups.

    With ``layer_decay`` < 1 and ``rule`` ``model`` the model must expose ``lr_layer_id(name) -> int`` and
    ``num_lr_layers`` (layers 0 .. top = num_lr_layers - 1, the head last); layer i gets ``layer_decay ** (top -
    i)``, or with ``layer_decay_depth`` N > 0 ``layer_decay ** ((N + 1) (top - i) / top)`` (iTPN's scripts, N = 12).
    ``rule`` ``mmdet_beit`` / ``mmseg_itpn``: the published dense constructors (``published_dense_layer``) with
    their ``num_layers``, for a dense task model (``backbone_prefix``).
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    use_layers = layer_decay < 1.0
    if use_layers and rule == "model" and not (hasattr(model, "lr_layer_id") and hasattr(model, "num_lr_layers")):
        raise ConfigError(f"optim.layer_decay={layer_decay} needs a model with lr_layer_id() and num_lr_layers; "
                          f"{type(model).__name__} has neither")
    if use_layers and rule != "model" and not hasattr(model, "backbone_prefix"):
        raise ConfigError(f"optim.layer_decay_rule={rule} is the published dense rule: it needs a dense task model "
                          f"(UperNet, Mask R-CNN), not {type(model).__name__}")
    if rule == "model":
        top = model.num_lr_layers - 1 if use_layers else 0
        per_layer = (layer_decay_depth + 1) / top if use_layers and layer_decay_depth else 1.0
        layer_of = getattr(model, "lr_layer_id", None)
    else:
        top = num_layers + 1
        per_layer = 13 / (top + 1) if rule == "mmseg_itpn" else 1.0
        layer_of = lambda name: published_dense_layer(name, model.backbone_prefix, top, rule)  # noqa: E731
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not _is_no_decay(name, param, skip)
        layer = layer_of(name) if use_layers else 0
        key = (layer, decay)
        if key not in groups:
            groups[key] = {"name": f"layer{layer}_{'decay' if decay else 'no_decay'}", "params": [],
                           "lr_scale": layer_decay ** ((top - layer) * per_layer) if use_layers else 1.0,
                           "wd_scale": 1.0 if decay else 0.0}
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


# The embeddings each published dense constructor puts at layer 0 (besides ``patch_embed.*``): the detection one
# (BEiT's, det/mmcv_custom/layer_decay_optimizer_constructor.py) names ``pos_embed``, which the iTPN detection
# backbone calls ``absolute_pos_embed``, so there it falls to the top layer; the segmentation one
# (seg/mmcv_custom/itpn_layer_decay_optimizer_constructor.py) names ``absolute_pos_embed``.
PUBLISHED_LAYER0 = {"mmdet_beit": ("cls_token", "mask_token", "pos_embed"),
                    "mmseg_itpn": ("cls_token", "mask_token", "absolute_pos_embed")}


def published_dense_layer(name: str, prefix: str, top: int, rule: str) -> int:
    """The layer id the published dense constructors give parameter ``name`` of a task model whose backbone sits
    under ``prefix``: embeddings 0, entry i of the backbone's ``blocks`` (MLP blocks, merges and attention blocks
    alike) i + 1, everything else (pyramid, heads) ``top`` = num_layers + 1. With iTPN-B's 32 entries and
    num_layers 30 the last two entries get ids 31 and 32 = top + 1 (lr scale 1 / decay), as published."""
    inner = name[len(prefix):] if name.startswith(prefix) else None
    if inner is None:
        return top
    if inner.startswith("patch_embed") or inner in PUBLISHED_LAYER0[rule]:
        return 0
    if inner.startswith("blocks."):
        return int(inner.split(".")[1]) + 1
    return top


def _is_no_decay(name: str, param: torch.Tensor, skip: set[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or name in skip or leaf in skip or leaf.startswith("gamma")


def choose_optimizer(cfg: OptimConfig, offload: bool, device: torch.device) -> str:
    """``adamw`` | ``adamw_fused`` | ``fused_adam`` | ``cpu_adam`` for a run whose parameters live on
    ``device`` (see the module docstring)."""
    cuda = device.type == "cuda"
    if cfg.optimizer != "auto":
        if offload and cfg.optimizer != "cpu_adam":
            raise ConfigError(f"optim.optimizer={cfg.optimizer} cannot run with ZeRO optimizer offload; use cpu_adam "
                              "or auto")
        if cfg.optimizer == "fused_adam" and not cuda:
            raise ConfigError("optim.optimizer=fused_adam needs CUDA; use auto or adamw on the CPU")
        return cfg.optimizer
    if offload:
        return "cpu_adam"
    return "adamw_fused" if cuda else "adamw"


def build_optimizer(groups: Iterable[dict[str, Any]], cfg: OptimConfig, kind: str) -> torch.optim.Optimizer:
    """The optimizer over ``groups``; lr and weight decay are set by the schedule before every step."""
    groups = list(groups)
    common = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if kind in ("adamw", "adamw_fused"):
        return torch.optim.AdamW(groups, fused=kind == "adamw_fused", **common)
    if kind == "fused_adam":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **common)
    if kind == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **common)
    raise ConfigError(f"unknown optimizer kind {kind!r}")
