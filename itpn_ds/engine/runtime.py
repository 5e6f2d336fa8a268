"""Process set-up: distributed init, device, determinism, the DeepSpeed engine.

``init_distributed`` reads the launcher through ``itpn_ds.distributed.detect()`` and starts
``deepspeed.init_distributed`` (NCCL on CUDA, gloo on the CPU). ``build_engine`` turns a model, its
parameter groups and the run configuration into a DeepSpeed engine.
"""
from __future__ import annotations

import copy
import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydantic
import torch
from torch import nn

from itpn_ds import distributed
from itpn_ds.config import ConfigError, RunConfig
from itpn_ds.engine.ds_config import offloads_optimizer, zero_stage
from itpn_ds.engine.optim import build_optimizer, choose_optimizer, param_groups
from itpn_ds.errors import UserError

log = logging.getLogger("itpn_ds.engine")


@dataclass(frozen=True)
class Runtime:
    dist: distributed.DistEnv
    device: torch.device

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size


def init_distributed() -> Runtime:
    """Join the process group of whichever launcher started us (a single process is a group of one)."""
    import deepspeed

    env = distributed.detect()
    distributed.export(env)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(env.local_rank)
    try:
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                                   verbose=False)
    except torch.distributed.DistNetworkError as exc:
        raise UserError(f"cannot rendezvous at {env.master_addr}:{env.master_port} ({env.launcher} launch): "
                        f"{str(exc).splitlines()[0]}; if the port is taken, set MASTER_PORT to a free one "
                        "(single-process runs pick one themselves when MASTER_PORT is unset)") from exc
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    return Runtime(env, device)


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical initial weights; data order comes from the loaders' own seeds."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_deterministic() -> None:
    """Deterministic kernels (bitwise-reproducible runs on the CPU; on CUDA at some speed cost)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False


def build_engine(model: nn.Module, cfg: RunConfig, runtime: Runtime, ds_config: dict[str, Any],
                 load_universal: bool = False) -> Any:
    """``deepspeed.initialize`` with our parameter groups, optimizer and the resolved JSON (``build_ds_config``)."""
    import deepspeed

    ds = copy.deepcopy(ds_config)
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    stage = zero_stage(ds)
    if cfg.deepspeed.precision == "fp32" and stage == 0:
        raise ConfigError("deepspeed.precision=fp32 with ZeRO stage 0 has no non-finite gradient check in "
                          "DeepSpeed, so bad steps could not be skipped; use bf16/fp16 or ZeRO stage >= 1")
    check_precision_supported(cfg.deepspeed.precision)
    kind = choose_optimizer(cfg.optim, offloads_optimizer(ds), runtime.device)
    o = cfg.optim
    groups = param_groups(model, o.layer_decay, o.layer_decay_depth, o.layer_decay_rule, o.layer_decay_layers)
    optimizer = build_optimizer(groups, cfg.optim, kind)
    if stage == 3 and cfg.model.compile == "on":
        gather_compiled_blocks_whole(model)
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"deepspeed.config={cfg.deepspeed.config}: {'.'.join(map(str, first['loc']))}: "
                          f"{first['msg']} ({exc.error_count()} problem(s)); fix the DeepSpeed JSON") from exc
    if runtime.rank == 0:
        log.info("engine: ZeRO stage %d, %s, optimizer %s (%s) over %d parameter groups, %d ranks", stage,
                 cfg.deepspeed.precision, kind, type(optimizer).__name__, len(optimizer.param_groups),
                 runtime.world_size)
    return engine


def gather_compiled_blocks_whole(model: nn.Module) -> None:
    """ZeRO-3 gathers each compiled block's parameters at the block's boundary, not at each of its layers: the
    blocks become ZeRO-3 leaf modules (``deepspeed.utils.set_z3_leaf_module``), so DeepSpeed hooks none of their
    submodules and no hook of its runs inside a compiled forward (traced there, its parameter fetches break the
    graph and recompile it at every layer)."""
    from deepspeed.utils import set_z3_leaf_module

    from itpn_ds.models.compile import repeated_blocks

    for block in repeated_blocks(model):
        set_z3_leaf_module(block, True)


def check_precision_supported(precision: str) -> None:
    """Fail with the reason when DeepSpeed's accelerator cannot train in ``precision`` (fp16 on the CPU)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {"fp16": accelerator.is_fp16_supported, "bf16": accelerator.is_bf16_supported}.get(precision)
    if supported is not None and not supported():
        raise ConfigError(f"deepspeed.precision={precision}: DeepSpeed's {accelerator.device_name()} accelerator does "
                          "not support it here (fp16 needs a CUDA device); use bf16 or fp32")
