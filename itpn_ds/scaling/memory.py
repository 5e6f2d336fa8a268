"""GPUs and the per-GPU bytes of model states under DeepSpeed ZeRO stages 0-3.

Model states follow the ZeRO paper's mixed-precision Adam accounting (Rajbhandari et al., SC'20), for a
model of ``P`` parameters trained on ``N`` data-parallel ranks with bf16 weights:

| stage | bf16 params | gradients | fp32 master + Adam m + v (12 B/param) |
|---|---|---|---|
| 0 | 2P | gP | 12P |
| 1 | 2P | gP | 12P / N |
| 2 | 2P | gP / N | 12P / N |
| 3 | 2P / N | gP / N | 12P / N |

``g`` is the bytes per gradient element: 2 with DeepSpeed's default (gradients accumulated in the model
dtype), 4 with ``data_types.grad_accum_dtype = fp32``. A partition is ``ceil(P / N)`` elements, as DeepSpeed
pads its flat buffers to a multiple of ``N``. Stage 0 is plain data parallelism with replicated fp32 master
weights and Adam moments (the ZeRO paper's baseline).

DeepSpeed's own buffers on top (``CommBuffers``): ZeRO-1/2 stage gradients in one ``reduce_bucket_size``
buffer (two with ``overlap_comm``), allocated at that size whatever the model size; ZeRO-3 gathers the
parameters of the running module plus a prefetch bucket.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from itpn_ds.engine.ds_config import auto_bucket_size

GIB = 1024**3
MIB = 1024**2

BF16_BYTES = 2
FP32_BYTES = 4
ADAM_FP32_STATE_BYTES = 3 * FP32_BYTES  # master weight, exp_avg, exp_avg_sq

ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class GPU:
    """One accelerator in an 8-GPU node: memory as ``nvidia-smi`` reports it (bytes), dense bf16 peak
    (FLOP/s), NVLink bandwidth per direction (bytes/s) and its own InfiniBand NIC's line rate (bit/s)."""

    name: str
    memory_bytes: int
    peak_bf16_flops: float
    nvlink_bytes_per_s: float
    nic_bits_per_s: float
    gpus_per_node: int = 8

    def bus_bytes_per_s(self, world: int) -> float:
        """Ring-collective bus bandwidth per GPU: NVLink inside a node; across nodes NCCL runs one ring per
        NIC, so a node's NICs together carry what each GPU sends, and the slower of the two bounds it."""
        if world <= self.gpus_per_node:
            return self.nvlink_bytes_per_s
        return min(self.nvlink_bytes_per_s, self.gpus_per_node * self.nic_bits_per_s / 8)


GPUS: dict[str, GPU] = {
    "h100-80gb": GPU("H100-80GB SXM", 81559 * MIB, 989e12, 450e9, 400e9),
    "h200": GPU("H200-141GB SXM", 143771 * MIB, 989e12, 450e9, 400e9),
    "a100-80gb": GPU("A100-80GB SXM", 81920 * MIB, 312e12, 300e9, 200e9),
}


@dataclass(frozen=True)
class DeepSpeedBuffers:
    """DeepSpeed buffer sizes in elements (the defaults are DeepSpeed 0.19's)."""

    reduce_bucket_elements: int = 500_000_000
    overlap_comm: bool = False
    prefetch_bucket_elements: int = 50_000_000


@dataclass(frozen=True)
class ModelStateBytes:
    """Per-GPU bytes of one rank's model states."""

    params: int
    grads: int
    optimizer: int
    comm_buffers: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.comm_buffers


def partition(n_params: int, world: int) -> int:
    """Elements of one rank's ZeRO partition of ``n_params`` over ``world`` ranks (padded, so ceil)."""
    return math.ceil(n_params / world)


def model_state_bytes(
    n_params: int,
    stage: int,
    world: int,
    *,
    grad_bytes: int = BF16_BYTES,
    largest_module_params: int = 0,
    buffers: DeepSpeedBuffers = DeepSpeedBuffers(),
) -> ModelStateBytes:
    """Bytes of bf16 params, gradients, fp32 optimizer state and DeepSpeed buffers on one of ``world`` ranks.

    ``largest_module_params`` is the parameter count of the largest module ZeRO-3 gathers at once
    (one transformer block); it only matters for stage 3.
    """
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage}")
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if n_params < 1:
        raise ValueError(f"parameter count must be >= 1, got {n_params}")
    shard = partition(n_params, world)
    params = BF16_BYTES * (shard if stage == 3 else n_params)
    grads = grad_bytes * (shard if stage >= 2 else n_params)
    optimizer = ADAM_FP32_STATE_BYTES * (n_params if stage == 0 else shard)
    return ModelStateBytes(params, grads, optimizer, comm_buffer_bytes(n_params, stage, largest_module_params, buffers))


def comm_buffer_bytes(n_params: int, stage: int, largest_module_params: int, buffers: DeepSpeedBuffers) -> int:
    """DeepSpeed's staging buffers: none at stage 0; the gradient reduce bucket(s) at stages 1-2 (allocated at
    full ``reduce_bucket_size``, which our JSONs leave "auto": ``auto_bucket_size``, the parameter count capped
    at ``reduce_bucket_elements`` and rounded up to DeepSpeed's alignment); at stage 3 a reduce bucket plus the
    gathered bf16 parameters (the running module and the prefetch bucket, at most the whole model)."""
    if stage == 0:
        return 0
    n_reduce_buffers = 2 if buffers.overlap_comm else 1
    reduce = BF16_BYTES * auto_bucket_size(n_params, buffers.reduce_bucket_elements) * n_reduce_buffers
    if stage < 3:
        return reduce
    gathered = min(n_params, largest_module_params + buffers.prefetch_bucket_elements)
    return reduce + BF16_BYTES * gathered


def teacher_weight_bytes(n_teacher_params: int) -> int:
    """A frozen online teacher kept in bf16 on every GPU (never partitioned: it is not a DeepSpeed module)."""
    return BF16_BYTES * n_teacher_params
