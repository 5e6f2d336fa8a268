"""The run's model (``model.*``): built from the registry, checked against the device, its FLOPs per image.

Each builder takes the run configuration and returns the real model of ``itpn_ds.models``; what a task adds to
it (SyncBatchNorm, its own checks) is the task's (``itpn_ds.engine.tasks``).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from itpn_ds.errors import ConfigError, import_for

if TYPE_CHECKING:  # config.py imports the task modules, which import this one: no import of config at run time
    from itpn_ds.config import RunConfig


def build_model(cfg: RunConfig) -> nn.Module:
    """``itpn_ds.models.create_model(model.name, drop_path_rate, **model.kwargs)`` (our pre-training and task
    names, timm's classifiers), the checkpointing policy, the attention backend, then (with
    ``model.compile=on``) regional compilation of the repeated blocks (``itpn_ds.models.compile``: compiled
    blocks run inside the policy's checkpoints)."""
    import_for("itpn_ds.models", "model.name")  # registers the timm names
    from itpn_ds.models.layers import set_attention_backend
    from itpn_ds.models.registry import create_model

    _check_model_kwargs(cfg)
    try:
        model = create_model(cfg.model.name, drop_path_rate=cfg.model.drop_path_rate, **cfg.model.kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:  # ValueError: an option out of its choices (a head, a pool)
        raise ConfigError(f"model.name={cfg.model.name!r} with model.kwargs={cfg.model.kwargs}: {exc}") from exc
    policy = cfg.model.grad_checkpointing
    if policy != "off":
        every_k = 1 if policy == "every" else cfg.model.checkpoint_every_k
        model.set_grad_checkpointing(True, every_k=every_k)
    try:
        set_attention_backend(model, cfg.model.attention)
    except ValueError as exc:
        raise ConfigError(f"model.attention={cfg.model.attention}: {exc}") from exc
    if cfg.model.compile == "on":
        from itpn_ds.models.compile import compile_repeated_blocks

        try:
            compile_repeated_blocks(model)
        except ValueError as exc:
            raise ConfigError(f"model.compile=on with model.name={cfg.model.name!r}: {exc}; use model.compile=off") from exc
    return model


def check_trainable_here(cfg: RunConfig, device: torch.device) -> None:
    """Refuse, before any work, a training configuration this device cannot run."""
    if cfg.model.attention == "flex" and device.type == "cpu":
        raise ConfigError(f"model.attention=flex: FlexAttention has no backward on the CPU (torch {torch.__version__}); "
                          "train on the CPU with model.attention=sdpa (flex is for CUDA, or CPU evaluation)")


def _check_model_kwargs(cfg: RunConfig) -> None:
    """Every ``model.kwargs`` key must be a constructor keyword of the model's class (checked before any
    work, so a typo is one line naming the key rather than a TypeError from deep in the build)."""
    from itpn_ds.models.registry import MODEL_CONFIGS, constructor_keywords

    if cfg.model.name not in MODEL_CONFIGS:
        return  # another timm model: timm checks its own keywords
    cls = MODEL_CONFIGS[cfg.model.name][0]
    known = constructor_keywords(cls)
    unknown = sorted(set(cfg.model.kwargs) - known)
    if unknown:
        raise ConfigError(f"model.kwargs.{unknown[0]}: not a keyword of {cls.__name__} ({cfg.model.name}); "
                          f"known keywords: {', '.join(sorted(known))}")


def forward_flops_per_image(model: nn.Module, image_size: int | tuple[int, int] | None = None) -> float:
    """Forward FLOPs of one image (of ``image_size``, (H, W); None: the model's own) from the architecture
    (``itpn_ds.models.flops``); 0 when unknown."""
    try:
        flops = importlib.import_module("itpn_ds.models.flops")
    except ImportError:
        return 0.0
    return float(flops.forward_flops(model, image_size))
