"""One row of the scaling plan: per-GPU memory, fit, batch arithmetic and time for one configuration.

``plan_row`` combines the model states (``memory``), the activations (``activations``) and the step time
(``throughput``) for a (GPU count, ZeRO stage, checkpoint policy, micro-batch) point. ``best_rows`` and
``largest_micro_batches`` are the two searches the documentation tables show.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from itpn_ds.scaling.activations import ActivationBytes, CheckpointPolicy, activation_bytes
from itpn_ds.scaling.memory import GPU, GIB, DeepSpeedBuffers, ModelStateBytes, model_state_bytes, teacher_weight_bytes
from itpn_ds.scaling.spec import ModelSpec
from itpn_ds.scaling.throughput import StepFlops, collective_bytes_per_step, model_flops_utilization

IMAGENET_1K_TRAIN_IMAGES = 1_281_167


@dataclass(frozen=True)
class Assumptions:
    """What the plan assumes rather than derives: utilization, network, reserve, buffers, dtypes, data."""

    hfu: float = 0.40  # executed FLOPs / (time x peak)
    network_efficiency: float = 0.80  # achieved bus bandwidth / link bandwidth (NVLink, NICs)
    reserve_bytes: int = 6 * GIB  # CUDA context, NCCL buffers, allocator fragmentation
    grad_bytes: int = 2  # bf16 gradient accumulation (DeepSpeed default); 4 for fp32
    buffers: DeepSpeedBuffers = field(default_factory=DeepSpeedBuffers)
    epochs: int = 300
    train_images: int = IMAGENET_1K_TRAIN_IMAGES

    def __post_init__(self) -> None:
        if not 0 < self.hfu <= 1:
            raise ValueError(f"utilization must be in (0, 1], got {self.hfu}")
        if not 0 < self.network_efficiency <= 1:
            raise ValueError(f"network efficiency must be in (0, 1], got {self.network_efficiency}")


@dataclass(frozen=True)
class Config:
    """One point of the search space."""

    gpus: int
    zero_stage: int
    checkpoint: CheckpointPolicy
    micro_batch: int
    global_batch: int
    online_teacher: bool

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"GPU count must be >= 1, got {self.gpus}")
        if self.micro_batch < 1:
            raise ValueError(f"micro-batch must be >= 1, got {self.micro_batch}")
        if self.global_batch % (self.micro_batch * self.gpus):
            raise ValueError(
                f"global batch {self.global_batch} is not a multiple of micro-batch {self.micro_batch} x "
                f"{self.gpus} GPUs = {self.micro_batch * self.gpus}"
            )

    @property
    def accum_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.gpus)


@dataclass(frozen=True)
class Row:
    """The plan for one ``Config``: bytes per GPU, fit, batch arithmetic, time."""

    config: Config
    states: ModelStateBytes
    activations: ActivationBytes
    teacher_weights: int
    reserve: int
    capacity: int
    flops: StepFlops
    compute_s: float  # per optimizer step
    comm_s: float  # per optimizer step
    steps_per_epoch: int
    epochs: int
    peak_flops: float  # per GPU

    @property
    def total_bytes(self) -> int:
        return self.states.total + self.activations.peak + self.teacher_weights + self.reserve

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity

    @property
    def step_s(self) -> float:
        """Step time with communication fully overlapped with compute (the optimistic bound)."""
        return max(self.compute_s, self.comm_s)

    @property
    def comm_bound(self) -> bool:
        return self.comm_s > self.compute_s

    @property
    def images_per_s(self) -> float:
        return self.config.global_batch / self.step_s

    @property
    def hours(self) -> float:
        return self.epochs * self.steps_per_epoch * self.step_s / 3600

    @property
    def mfu(self) -> float:
        return model_flops_utilization(self.flops, self.images_per_s / self.config.gpus, self.peak_flops)

    def to_dict(self) -> dict:
        """JSON-ready: the inputs, every byte term, the fit and the time figures."""
        return {
            **asdict(self.config),
            "checkpoint": str(self.config.checkpoint),
            "accum_steps": self.config.accum_steps,
            "bytes": {
                **{f"states_{k}": v for k, v in asdict(self.states).items()},
                **{f"activations_{k}": v for k, v in asdict(self.activations).items()},
                "activations_peak": self.activations.peak,
                "teacher_weights": self.teacher_weights,
                "reserve": self.reserve,
                "total": self.total_bytes,
                "capacity": self.capacity,
            },
            "fits": self.fits,
            "flops_per_image": {**asdict(self.flops), "model": self.flops.model, "executed": self.flops.executed},
            "compute_s_per_step": self.compute_s,
            "comm_s_per_step": self.comm_s,
            "step_s": self.step_s,
            "comm_bound": self.comm_bound,
            "images_per_s": self.images_per_s,
            "mfu": self.mfu,
            "steps_per_epoch": self.steps_per_epoch,
            "hours": self.hours,
        }


def plan_row(spec: ModelSpec, gpu: GPU, config: Config, assumptions: Assumptions) -> Row:
    """Memory, fit and time of ``spec`` trained with ``config`` on ``config.gpus`` x ``gpu``."""
    if config.online_teacher and spec.teacher is None:
        raise ValueError(f"{spec.name}: an online teacher was asked for but the spec has none")
    states = model_state_bytes(
        spec.n_params,
        config.zero_stage,
        config.gpus,
        grad_bytes=assumptions.grad_bytes,
        largest_module_params=spec.largest_block_params,
        buffers=assumptions.buffers,
    )
    acts = activation_bytes(spec.blocks, spec.other, config.micro_batch, config.checkpoint)
    teacher = spec.teacher if config.online_teacher else None
    flops = StepFlops(
        student_forward=spec.forward_flops,
        recompute=spec.recompute_flops(config.checkpoint),
        teacher_forward=teacher.forward_flops if teacher else 0.0,
    )
    compute_s = config.global_batch * flops.executed / (config.gpus * gpu.peak_bf16_flops * assumptions.hfu)
    bus_bytes_per_s = assumptions.network_efficiency * gpu.bus_bytes_per_s(config.gpus)
    comm_s = collective_bytes_per_step(spec.n_params, config.zero_stage, config.gpus, config.accum_steps) / bus_bytes_per_s
    return Row(
        config=config,
        states=states,
        activations=acts,
        teacher_weights=teacher_weight_bytes(teacher.n_params) + teacher.transient_bytes(config.micro_batch) if teacher else 0,
        reserve=assumptions.reserve_bytes,
        capacity=gpu.memory_bytes,
        flops=flops,
        compute_s=compute_s,
        comm_s=comm_s,
        steps_per_epoch=math.ceil(assumptions.train_images / config.global_batch),
        epochs=assumptions.epochs,
        peak_flops=gpu.peak_bf16_flops,
    )
