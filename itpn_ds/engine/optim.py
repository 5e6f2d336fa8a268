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


def param_groups(model: nn.Module, layer_decay: float = 1.0, layer_decay_depth: int = 0) -> list[dict[str, Any]]:
    """AdamW groups for ``model``: [{"params", "lr_scale", "wd_scale", "name"}], no empty groups.

    With ``layer_decay`` < 1 the model must expose ``lr_layer_id(name) -> int`` and ``num_lr_layers``
    (layers 0 .. top = num_lr_layers - 1, the head last); layer i gets ``layer_decay ** (top - i)``, or with
    ``layer_decay_depth`` N > 0 ``layer_decay ** ((N + 1) (top - i) / top)`` (iTPN's scripts, N = 12).
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    use_layers = layer_decay < 1.0
    if use_layers and not (hasattr(model, "lr_layer_id") and hasattr(model, "num_lr_layers")):
        raise ConfigError(f"optim.layer_decay={layer_decay} needs a model with lr_layer_id() and num_lr_layers; "
                          f"{type(model).__name__} has neither")
    top = model.num_lr_layers - 1 if use_layers else 0
    per_layer = (layer_decay_depth + 1) / top if use_layers and layer_decay_depth else 1.0
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not _is_no_decay(name, param, skip)
        layer = model.lr_layer_id(name) if use_layers else 0
        key = (layer, decay)
        if key not in groups:
            groups[key] = {"name": f"layer{layer}_{'decay' if decay else 'no_decay'}", "params": [],
                           "lr_scale": layer_decay ** ((top - layer) * per_layer) if use_layers else 1.0,
                           "wd_scale": 1.0 if decay else 0.0}
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


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
