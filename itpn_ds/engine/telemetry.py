"""Per-step telemetry: timings of one optimizer step and the metrics derived from them.

Metrics (names as handed to the tracker, under ``train/``):
    loss, loss_<part>   mean over ranks of the step's micro-batches
    lr, grad_norm       the schedule's base lr; DeepSpeed's global gradient norm (before clipping)
    images_per_s        valid (non-padding) images of the step over all ranks / step wall time
    data_wait_frac      fraction of the step spent waiting for the loader (rank 0)
    targets_s           seconds spent getting teacher targets (cache lookup or online teacher, rank 0)
    mfu                 model FLOPs utilisation: 3 x forward FLOPs per image x images/s / (peak x ranks);
                        only when a peak is known (``telemetry.peak_tflops`` or a recognised GPU)
    peak_mem_gib        peak device memory on CUDA (max allocated), peak resident set size on the CPU
    param_mib, optim_state_mib  rank 0's parameters and optimizer state as stored under its ZeRO stage
                        (measured from the live tensors, ``itpn_ds.engine.memory``)
    skipped_steps       non-finite steps skipped so far
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from itpn_ds.engine.memory import StateBytes

# Dense bf16 peak per device (TFLOP/s), by a substring of torch.cuda.get_device_name().
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def device_peak_tflops(configured: float) -> float:
    """The peak used for MFU: the configured one, else a known GPU's, else 0 (MFU not reported)."""
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return peak
    return 0.0


def model_flops_utilization(flops_per_image: float, images_per_s: float, peak_tflops: float,
                            world_size: int = 1) -> float:
    """MFU: 3 x forward FLOPs per image (forward + a backward of twice its cost) x images/s, over the summed
    peak of ``world_size`` devices (``peak_tflops`` TFLOP/s each)."""
    return 3 * flops_per_image * images_per_s / (peak_tflops * 1e12 * world_size)


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


@dataclass
class StepTimer:
    """Wall-clock split of one step: total, waiting for data, getting targets."""

    start: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    targets: float = 0.0

    def waited(self, seconds: float) -> None:
        self.data_wait += seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def step_metrics(losses: dict[str, float], lr: float, grad_norm: float | None, images: float, timer: StepTimer,
                 flops_per_image: float, peak_tflops: float, world_size: int, skipped_steps: int,
                 state_bytes: StateBytes | None = None) -> dict[str, float]:
    """The ``train/*`` metrics of one step (see the module docstring)."""
    seconds = max(timer.elapsed(), 1e-9)
    metrics = {f"train/{k}": v for k, v in losses.items()}
    metrics.update({
        "train/lr": lr,
        "train/images_per_s": images / seconds,
        "train/step_s": seconds,
        "train/data_wait_frac": timer.data_wait / seconds,
        "train/targets_s": timer.targets,
        "train/peak_mem_gib": peak_memory_gib(),
        "train/skipped_steps": float(skipped_steps),
    })
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    if state_bytes is not None:
        metrics["train/param_mib"] = state_bytes.params / 2**20
        metrics["train/optim_state_mib"] = state_bytes.optimizer / 2**20
    if peak_tflops > 0 and flops_per_image > 0:
        metrics["train/mfu"] = model_flops_utilization(flops_per_image, images / seconds, peak_tflops, world_size)
    return metrics


def format_metrics(step: int, epoch: int, metrics: dict[str, float]) -> str:
    """One log line: ``step 120 epoch 3 loss 0.4123 lr 1.2e-03 ...``."""
    parts = [f"step {step}", f"epoch {epoch}"]
    for key, value in metrics.items():
        name = key.split("/", 1)[-1]
        parts.append(f"{name} {value:.4g}")
    return " ".join(parts)
