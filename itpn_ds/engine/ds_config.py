"""The DeepSpeed JSON for a run: a file from ``ds_configs/`` with its "auto" values filled from the run.

Run-dependent values (micro-batch, accumulation and global batch from ``batch_plan``, clipping, precision, ZeRO stage) belong to
the run configuration. The JSON may leave them ``"auto"`` (the shipped files do) or state them; a stated
value that disagrees with the run is an error naming the key and both values, never silently overridden.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from itpn_ds.config import ConfigError, RunConfig
from itpn_ds.engine.schedule import batch_plan

DS_CONFIGS_DIR = Path(__file__).parents[1] / "ds_configs"  # a link to the repository's ds_configs/ (package data)
AUTO = "auto"
# Communication buckets (elements) that the JSON may leave "auto": the model's parameter count, capped at
# DeepSpeed's default. A bucket larger than the model only costs memory (and, on the CPU, time).
BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size")
MAX_BUCKET = 500_000_000
# What DeepSpeed 0.19.8 requires of them: ZeRO-1/2 (runtime/zero/stage_1_and_2.py) asserts allgather_bucket_size
# % nccl_start_alignment_factor == 0, the factor being 2 (4-byte alignment of 2-byte elements); reduce_bucket_size
# must be > 0 (runtime/zero/config.py) at every stage, and ZeRO-3 (stage3.py) places no alignment on it.
BUCKET_ALIGNMENT = 2
ZERO_STAGES = (0, 1, 2, 3)


def ds_config_path(name: str) -> Path:
    """``zero2`` -> ``ds_configs/zero2.json``; a path is used as is."""
    path = Path(name)
    if path.suffix != ".json":
        path = DS_CONFIGS_DIR / f"{name}.json"
    if not path.is_file():
        shipped = sorted(p.stem for p in DS_CONFIGS_DIR.glob("*.json"))
        raise ConfigError(f"deepspeed.config: {path} does not exist (shipped: {', '.join(shipped)})")
    return path


def load_ds_json(name: str) -> dict[str, Any]:
    path = ds_config_path(name)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {exc}") from exc


def build_ds_config(cfg: RunConfig, world_size: int, num_params: int = MAX_BUCKET) -> dict[str, Any]:
    """The dict handed to ``deepspeed.initialize``: the JSON with every "auto" resolved from ``cfg`` (and the
    bucket sizes from the model's ``num_params``)."""
    source = str(ds_config_path(cfg.deepspeed.config))
    ds = copy.deepcopy(load_ds_json(cfg.deepspeed.config))
    plan = batch_plan(cfg, world_size)
    _settle(ds, "train_micro_batch_size_per_gpu", plan.micro_batch, "data.micro_batch", source)
    _settle(ds, "gradient_accumulation_steps", plan.grad_accum, "schedule.grad_accum", source)
    _settle(ds, "train_batch_size", plan.global_batch, f"schedule.global_batch ({plan.describe()})", source)
    _settle(ds, "gradient_clipping", cfg.optim.clip_grad, "optim.clip_grad", source)

    precision = cfg.deepspeed.precision
    for section, wanted in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        block = ds.setdefault(section, {})
        _settle(block, "enabled", wanted, f"deepspeed.precision={precision}", source, key_name=f"{section}.enabled")

    zero = ds.setdefault("zero_optimization", {"stage": 0})
    check_stage(zero.get("stage", 0), source)
    if cfg.deepspeed.zero_stage >= 0:
        stated = zero.get("stage", 0)
        if stated not in (AUTO, cfg.deepspeed.zero_stage) and "stage" in zero:
            raise ConfigError(f"{source}: zero_optimization.stage is {stated} but the run asks for "
                              f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}; drop one of them")
        zero["stage"] = cfg.deepspeed.zero_stage
    elif zero.get("stage") == AUTO:
        raise ConfigError(f"{source}: zero_optimization.stage is \"auto\"; set deepspeed.zero_stage")
    for key in BUCKET_KEYS:
        if zero.get(key) == AUTO:
            zero[key] = auto_bucket_size(num_params)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def check_stage(stated: Any, source: str) -> None:
    """``zero_optimization.stage`` must be a ZeRO stage 0-3 or "auto" (DeepSpeed would fail on it with a bare
    ``ValueError``)."""
    if stated != AUTO and (isinstance(stated, bool) or stated not in ZERO_STAGES):
        raise ConfigError(f"{source}: zero_optimization.stage is {stated!r}; give 0, 1, 2 or 3 (a number), or "
                          "\"auto\" with deepspeed.zero_stage set")


def auto_bucket_size(num_params: int, cap: int = MAX_BUCKET) -> int:
    """Elements of an "auto" bucket: ``num_params`` capped at ``cap``, rounded up to a multiple of
    ``BUCKET_ALIGNMENT`` (so an odd parameter count passes ZeRO-1/2's check)."""
    return BUCKET_ALIGNMENT * math.ceil(min(num_params, cap) / BUCKET_ALIGNMENT)


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def _settle(block: dict[str, Any], key: str, run_value: Any, run_key: str, source: str,
            key_name: str | None = None) -> None:
    """Fill ``block[key]`` with the run's value when absent or "auto"; fail when it states another."""
    stated = block.get(key, AUTO)
    if stated != AUTO and stated != run_value:
        raise ConfigError(f"{source}: {key_name or key} is {stated!r} but the run configuration gives "
                          f"{run_value!r} ({run_key}); set it to \"auto\" or make them agree")
    block[key] = run_value
