"""Per-step learning-rate and weight-decay schedules.

lr (``optim.schedule``), after a linear warmup over ``warmup`` steps:

* ``cosine``: linear from 0 to ``lr``, then a half cosine from ``lr`` down to ``min_lr`` at the last step;
* ``poly`` (mmseg's ``policy='poly'``, the published segmentation schedule): ``(lr - min_lr) (1 - t) ** power +
  min_lr`` with t = step / total steps over the whole run; during warmup that value times the linear ramp
  ``(step + 1) / warmup`` (mmcv multiplies its warmup into the regular lr the same way);
* ``step`` (mmdet's ``policy='step'``, the published detection schedule): ``lr x gamma ** n``, n the number of
  milestones (``optim.lr_step_epochs``, converted to optimizer steps) at or before the step, after the linear
  warmup from 0.

Weight decay: a half cosine from ``weight_decay`` to ``weight_decay_end`` over the whole run (constant when
they are equal). All are pure functions of the optimizer-step index, so a resumed run needs only the step.

The batch of a step (:func:`batch_plan`): ``schedule.global_batch`` samples over all ranks, kept on any world size
by accumulating ``global_batch / (micro_batch x world size)`` micro-batches per rank; lr is never rescaled.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from itpn_ds.config import ConfigError, OptimConfig, RunConfig


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's samples are split: ``global_batch = micro_batch x grad_accum x world_size``."""

    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.micro_batch} per rank x {self.world_size} ranks x "
                f"{self.grad_accum} accumulation steps")


def batch_plan(cfg: RunConfig, world_size: int) -> BatchPlan:
    """The split of ``schedule.global_batch`` over ``world_size`` ranks of ``data.micro_batch`` each; without a
    global batch, ``schedule.grad_accum`` (or 1) micro-batches per rank. Raises ConfigError naming the world
    sizes that keep the global batch when this one cannot, or when a stated ``grad_accum`` disagrees."""
    micro, accum, wanted = cfg.data.micro_batch, cfg.schedule.grad_accum, cfg.schedule.global_batch
    if not wanted:
        return BatchPlan(micro, accum or 1, world_size)
    if wanted % micro:
        raise ConfigError(f"schedule.global_batch={wanted} is not a multiple of data.micro_batch={micro}: make it one "
                          f"(e.g. data.micro_batch={math.gcd(wanted, micro)})")
    micro_batches = wanted // micro  # per optimizer step, over all ranks
    if micro_batches % world_size:
        sizes = [n for n in range(1, micro_batches + 1) if micro_batches % n == 0]
        raise ConfigError(f"schedule.global_batch={wanted} cannot be kept on {world_size} ranks of data.micro_batch="
                          f"{micro}: its {micro_batches} micro-batches per step do not split evenly over them; "
                          f"world sizes that keep it: {', '.join(map(str, sizes))} (or change data.micro_batch)")
    plan = BatchPlan(micro, micro_batches // world_size, world_size)
    if accum and accum != plan.grad_accum:
        raise ConfigError(f"schedule.grad_accum={accum} disagrees with schedule.global_batch={wanted} on {world_size} "
                          f"ranks of data.micro_batch={micro} (that takes {plan.grad_accum}); drop schedule.grad_accum")
    return plan


def with_batch_plan(cfg: RunConfig, plan: BatchPlan) -> RunConfig:
    """``cfg`` with the plan's accumulation and global batch written into ``schedule`` (what the run does)."""
    schedule = dataclasses.replace(cfg.schedule, grad_accum=plan.grad_accum, global_batch=plan.global_batch)
    return dataclasses.replace(cfg, schedule=schedule)


@dataclass(frozen=True)
class CosineSchedule:
    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    weight_decay: float
    weight_decay_end: float

    @classmethod
    def from_config(cls, cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> "CosineSchedule":
        warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(round(cfg.warmup_epochs * steps_per_epoch))
        return cls(cfg.lr, cfg.min_lr, min(warmup, total_steps), max(total_steps, 1), cfg.weight_decay,
                   cfg.weight_decay_end)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def weight_decay_at(self, step: int) -> float:
        progress = min(step / self.total_steps, 1.0)
        return self.weight_decay_end + 0.5 * (self.weight_decay - self.weight_decay_end) * (
            1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr and weight decay for ``step`` (scaled by its lr_scale / wd_scale)."""
        lr, wd = self.lr_at(step), self.weight_decay_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            group["weight_decay"] = wd * group.get("wd_scale", 1.0)
        return lr


@dataclass(frozen=True)
class PolySchedule(CosineSchedule):
    """The poly lr of the module docstring; weight decay as :class:`CosineSchedule`."""

    power: float = 1.0

    def lr_at(self, step: int) -> float:
        progress = min(step / self.total_steps, 1.0)
        lr = (self.lr - self.min_lr) * (1.0 - progress) ** self.power + self.min_lr
        return lr * (step + 1) / self.warmup_steps if step < self.warmup_steps else lr


@dataclass(frozen=True)
class StepSchedule(CosineSchedule):
    """The step lr of the module docstring (milestones in optimizer steps); weight decay as CosineSchedule."""

    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        return self.lr * self.gamma ** sum(step >= m for m in self.milestones)


def build_schedule(cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> CosineSchedule:
    """The schedule ``optim.schedule`` names, over ``total_steps`` optimizer steps."""
    base = CosineSchedule.from_config(cfg, steps_per_epoch, total_steps)
    if cfg.schedule == "poly":
        return PolySchedule(**vars(base), power=cfg.poly_power)
    if cfg.schedule == "step":
        milestones = tuple(int(round(epoch * steps_per_epoch)) for epoch in cfg.lr_step_epochs)
        return StepSchedule(**vars(base), milestones=milestones, gamma=cfg.lr_step_gamma)
    return base
