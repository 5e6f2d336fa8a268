"""The training loop shared by pre-training and fine-tuning.

One optimizer step = ``schedule.grad_accum`` micro-batches taken from a continuous stream over epochs.
At each step boundary, in this order: preemption agreement (all-reduce), the step, the non-finite check,
telemetry, a periodic checkpoint, and (fine-tuning) evaluation after an epoch ends.

Exact resume: the data order, masks and augmentation are functions of (seed, epoch, position) on the
data side; the loop saves the loader position, every rank's RNG states and its own counters at a step
boundary, so a resumed run takes the same steps on the same samples with the same random numbers.

Non-finite steps: DeepSpeed skips an optimizer step whose gradients are not finite (bf16/fp16 overflow
check) and reports it through ``was_step_applied()``; a non-finite loss on any rank is detected with the
all-reduce of the step's losses. Both count as a skipped step. After ``nonfinite.max_consecutive`` in a
row the run reloads the last good checkpoint and marks the steps of the streak in ``skip_steps``: their
batches are read (so the data position stays exact) but not trained on.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from itpn_ds.config import RunConfig, to_dict
from itpn_ds.data.batch import Batch, Loader
from itpn_ds.data.class_map import ClassMap
from itpn_ds.data.views import key_hash
from itpn_ds.engine.checkpoint import CheckpointManager, CheckpointRef, set_rng_state
from itpn_ds.engine.ema import WeightEma
from itpn_ds.engine.losses import Task
from itpn_ds.engine.memory import StateBytes, model_state_bytes
from itpn_ds.engine.preemption import PreemptionFlag
from itpn_ds.engine.probe import KnnProbe
from itpn_ds.engine.runtime import seed_everything
from itpn_ds.engine.schedule import CosineSchedule
from itpn_ds.engine.telemetry import StepTimer, device_peak_tflops, format_metrics, step_metrics
from itpn_ds.errors import UserError
from itpn_ds.models.compile import compile_report
from itpn_ds.tracking.base import Tracker

log = logging.getLogger("itpn_ds.engine")


class Preempted(Exception):
    """Raised after the preemption checkpoint is saved; the command exits with PREEMPTED_EXIT_CODE."""


class NonFiniteError(UserError, RuntimeError):
    """Non-finite steps that a rollback could not cure (no checkpoint, or too many rollbacks)."""


@dataclass
class TrainState:
    """The loop's counters, saved in every checkpoint's meta.json.

    step:                  optimizer steps done (applied or skipped); the schedule's index.
    epoch:                 epoch of the next micro-batch.
    skipped_steps:         non-finite steps skipped so far.
    consecutive_nonfinite: length of the current streak of skipped steps.
    rollbacks:             how often the run went back to a checkpoint.
    skip_steps:            steps whose batches are consumed without training (found bad before a rollback).
    evaluated_epochs:      epochs whose evaluation ran (fine-tuning).
    best_score:            best value of the task's selection metric seen (``LoopParts.best_metric``: top-1,
                           mIoU or box AP), -1 before the first evaluation.
    probed_step:           step of the last k-NN probe (``engine/probe.py``); probe_best: its best top-1s so far.
    """

    step: int = 0
    epoch: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    rollbacks: int = 0
    skip_steps: list[int] = field(default_factory=list)
    evaluated_epochs: int = 0
    best_score: float = -1.0
    probed_step: int = 0
    probe_best: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "TrainState":
        """The counters of a checkpoint's ``meta.json`` (older checkpoints named ``best_score`` ``best_top1``)."""
        meta = dict(meta)
        if "best_top1" in meta:
            meta["best_score"] = meta.pop("best_top1")
        return cls(**meta)


@dataclass
class LoopParts:
    """What the loop drives; built by ``itpn_ds.engine.commands``."""

    engine: Any
    loader: Loader
    task: Task
    schedule: CosineSchedule
    checkpoints: CheckpointManager
    tracker: Tracker
    device: torch.device
    total_steps: int
    flops_per_image: float = 0.0
    evaluate: Callable[[], dict[str, float]] | None = None
    on_best: Callable[[dict[str, float], int], None] | None = None
    ema: WeightEma | None = None
    best_metric: str = "top1"      # the evaluation metric that selects ``on_best`` (higher is better)
    eval_every_epochs: int = 1
    classes: ClassMap | None = None  # the class map trained, stored in every checkpoint (None: pre-training)
    probe: KnnProbe | None = None    # the k-NN probe of pre-training (engine/probe.py)


class Trainer:
    def __init__(self, cfg: RunConfig, parts: LoopParts, rank: int, world_size: int) -> None:
        self.cfg = cfg
        self.p = parts
        self.rank = rank
        self.world_size = world_size
        self.state = TrainState()
        self.preemption = PreemptionFlag()
        self.peak_tflops = device_peak_tflops(cfg.telemetry.peak_tflops)
        self.model_dtype = next(parts.engine.module.parameters()).dtype
        self._stream: Iterator[Batch] | None = None
        self.last_metrics: dict[str, float] = {}
        self.state_bytes: StateBytes | None = None  # measured after the first applied step (moments exist)

    # ------------------------------------------------------------------------------------ state I/O
    def save(self) -> CheckpointRef:
        meta = {"trainer": asdict(self.state), "task": self.cfg.task,
                "zero_stage": int(self.p.engine.zero_optimization_stage()),
                "precision": self.cfg.deepspeed.precision,
                "model": {"name": self.cfg.model.name, "kwargs": self.cfg.model.kwargs},
                "teacher": {"mode": self.cfg.teacher.mode, "arch": self.cfg.teacher.arch},
                "config": to_dict(self.cfg), **(self.p.classes.to_json() if self.p.classes else {})}
        rank_state = {"loader": self.p.loader.state_dict(), "epoch": self.state.epoch}
        if self.p.ema is not None:
            rank_state["ema"] = self.p.ema.state_dict()
        return self.p.checkpoints.save(self.p.engine, self.state.step, meta, rank_state)

    def restore(self, ref: CheckpointRef) -> None:
        """Load engine, counters, loader position and RNG from ``ref`` (all ranks)."""
        rank_state = self.p.checkpoints.load(self.p.engine, ref, int(self.p.engine.zero_optimization_stage()))
        self.state = TrainState.from_meta(ref.meta["trainer"])
        self.p.loader.load_state_dict(rank_state["loader"])
        if rank_state["rng"] is None:
            self._info("checkpoint %s was written by %d ranks under ZeRO stage %d: loaded through the universal "
                       "format at the same data position; RNG states re-seeded from (seed, step, rank)",
                       ref.path, ref.meta["world_size"], ref.meta["zero_stage"], level=logging.WARNING)
            seed_everything(key_hash("reshard", self.cfg.schedule.seed, self.state.step, self.rank) % 2**32)
        else:
            set_rng_state(rank_state["rng"])
        if self.p.ema is not None and rank_state.get("ema") is not None:
            self.p.ema.load_state_dict(rank_state["ema"])
        self._stream = None
        self._info("resumed from %s: step %d, epoch %d", ref.path, self.state.step, self.state.epoch)

    # ------------------------------------------------------------------------------------ the stream
    def _micro_batches(self) -> Iterator[Batch]:
        """Micro-batches from the saved position on, across epoch ends; the loader keeps the position."""
        while self.state.epoch < self.cfg.schedule.epochs:
            for batch in self.p.loader:
                yield batch
            self.state.epoch += 1
            self.p.loader.set_epoch(self.state.epoch)

    def _next_batch(self, timer: StepTimer) -> Batch:
        if self._stream is None:
            self._stream = self._micro_batches()
        start = time.perf_counter()
        batch = next(self._stream)
        timer.waited(time.perf_counter() - start)
        return self._prepare(batch)

    def _prepare(self, batch: Batch) -> Batch:
        """On the device, its inputs in the dtype the model takes (the batch decides: DeepSpeed does not cast)."""
        return batch.for_model(self.p.device, self.model_dtype)

    # -------------------------------------------------------------------------------------- the loop
    def run(self) -> dict[str, float]:
        """Train to ``total_steps``; returns the last step's metrics. Raises Preempted after a
        preemption checkpoint."""
        engine = self.p.engine
        every = self.cfg.checkpoint.every_steps
        try:
            while self.state.step < self.p.total_steps:
                if self.preemption.agreed(self.p.device):
                    self._info("preemption signal: checkpointing at step %d, then exiting", self.state.step,
                               level=logging.WARNING)
                    self.save()
                    raise Preempted(self.state.step)
                self._maybe_kill()
                rolled_back = self._train_step(engine)
                if not rolled_back:
                    self._maybe_probe()
                if not rolled_back and every and self.state.step % every == 0 and self.state.step < self.p.total_steps:
                    self.save()
                self._maybe_evaluate()
            if self.p.checkpoints.latest() is None or self.p.checkpoints.latest().meta["step"] != self.state.step:
                self.save()
            self._maybe_evaluate(final=True)
            if self.cfg.model.compile == "on":
                self._info("compile: %s", compile_report())
        finally:
            self.preemption.restore()
        return self.last_metrics

    def _train_step(self, engine: Any) -> bool:
        """One optimizer step; True when it ended in a rollback to a checkpoint."""
        step = self.state.step
        timer = StepTimer()
        lr = self.p.schedule.apply(engine.optimizer, step)
        if step in self.state.skip_steps:
            for _ in range(self.cfg.schedule.grad_accum):
                self._next_batch(timer)
            self._info("step %d: batches skipped (they caused non-finite steps before a rollback)", step + 1,
                       level=logging.WARNING)
            self.state.step += 1
            return False
        totals: dict[str, torch.Tensor] = {}
        images = 0.0
        for _ in range(self.cfg.schedule.grad_accum):
            batch = self._next_batch(timer)
            result = self.p.task.forward(engine, batch)
            loss = result.loss
            if step + 1 in self.cfg.debug.inject_nan_at_steps:
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
            timer.targets += result.targets_s
            images += float(result.valid)
            for name, value in {"loss": loss.detach(), **result.parts}.items():
                totals[name] = totals.get(name, 0.0) + value.float() / self.cfg.schedule.grad_accum
        losses = self._mean_over_ranks(totals)
        finite = all(math.isfinite(v) for v in losses.values())
        applied = engine.was_step_applied() and finite
        self.state.step += 1
        if not applied:
            self.state.skipped_steps += 1
            self.state.consecutive_nonfinite += 1
        if applied and self.state_bytes is None:
            self.state_bytes = model_state_bytes(engine)
        metrics = step_metrics(losses, lr, engine.get_global_grad_norm() if applied else None, images, timer,
                               self.p.flops_per_image, self.peak_tflops, self.world_size, self.state.skipped_steps,
                               self.state_bytes)
        self.last_metrics = metrics
        if self.state.step % self.cfg.telemetry.log_every == 0 or not applied or self.state.step == 1:
            self._info(format_metrics(self.state.step, self.state.epoch, metrics))
            self.p.tracker.log_metrics(metrics, step=self.state.step)
        if applied:
            self.state.consecutive_nonfinite = 0
            if self.p.ema is not None:
                self.p.ema.update()
            return False
        return self._on_nonfinite(losses)

    def _mean_over_ranks(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        names = sorted(totals)
        vec = torch.stack([torch.as_tensor(totals[n], dtype=torch.float32) for n in names]).to(self.p.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vec)
            vec /= self.world_size
        return {n: float(v) for n, v in zip(names, vec.tolist())}

    def _info(self, msg: str, *args: Any, level: int = logging.INFO) -> None:
        if self.rank == 0:
            log.log(level, msg, *args)

    def _on_nonfinite(self, losses: dict[str, float]) -> bool:
        """Count a skipped step (already done by the caller); roll back after a long streak."""
        self._info("step %d: non-finite loss or gradients (loss %s): step skipped (%d in a row, %d in all)",
                   self.state.step, losses.get("loss"), self.state.consecutive_nonfinite, self.state.skipped_steps,
                   level=logging.WARNING)
        if self.state.consecutive_nonfinite < self.cfg.nonfinite.max_consecutive:
            return False
        self._roll_back()
        return True

    def _roll_back(self) -> None:
        bad = list(range(self.state.step - self.state.consecutive_nonfinite, self.state.step))
        ref = self.p.checkpoints.latest()
        if ref is None:
            raise NonFiniteError(f"{len(bad)} non-finite steps in a row (steps {[s + 1 for s in bad]}) and no "
                                 "checkpoint to roll "
                                 "back to")
        carried = TrainState(skipped_steps=self.state.skipped_steps, rollbacks=self.state.rollbacks + 1,
                             skip_steps=sorted(set(self.state.skip_steps) | set(bad)))
        if carried.rollbacks > self.cfg.nonfinite.max_rollbacks:
            raise NonFiniteError(f"non-finite steps {[s + 1 for s in bad]} after {self.cfg.nonfinite.max_rollbacks} rollbacks; "
                                 "giving up")
        self._info("rolling back to %s (step %d) after non-finite steps %s; their batches will be skipped",
                   ref.path, ref.meta["step"], [s + 1 for s in bad], level=logging.WARNING)
        self.restore(ref)
        self.state.skipped_steps = carried.skipped_steps
        self.state.rollbacks = carried.rollbacks
        self.state.skip_steps = carried.skip_steps
        self.p.tracker.log_metrics({"train/rollbacks": float(carried.rollbacks)}, step=self.state.step)

    def _maybe_kill(self) -> None:
        """debug.kill_at_step: [rank, step] SIGKILLs that rank before the step (a crash drill)."""
        kill = self.cfg.debug.kill_at_step
        if kill and kill[0] == self.rank and kill[1] == self.state.step + 1:
            log.warning("debug.kill_at_step: rank %d SIGKILLs itself before step %d", self.rank, kill[1])
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------------------------------ evaluation
    def _maybe_probe(self) -> None:
        """The k-NN probe every ``probe.every_steps`` and after the last step, before that step's checkpoint
        (which then holds its best values)."""
        probe, final = self.p.probe, self.state.step >= self.p.total_steps
        if probe is None or self.state.probed_step == self.state.step or not (final or probe.due(self.state.step)):
            return
        self.state.probed_step = self.state.step
        metrics = probe.run(self.p.engine.module, self.state.step, self.state.probe_best, self.p.tracker, final)
        self.last_metrics = {**self.last_metrics, **metrics}

    def _maybe_evaluate(self, final: bool = False) -> None:
        if self.p.evaluate is None:
            return
        done = self.state.step * self.cfg.schedule.grad_accum // len(self.p.loader)  # epochs fully consumed
        every = max(self.p.eval_every_epochs, 1)
        if done <= self.state.evaluated_epochs or not (done % every == 0 or final):
            return
        self.state.evaluated_epochs = done
        metrics = self.p.evaluate()
        self._info("eval after epoch %d: %s", done, {k: round(v, 4) for k, v in metrics.items()})
        self.p.tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=self.state.step)
        if metrics[self.p.best_metric] > self.state.best_score:
            self.state.best_score = metrics[self.p.best_metric]
            if self.p.on_best is not None:
                self.p.on_best(metrics, self.state.step)
        self.last_metrics = {**self.last_metrics, **{f"eval/{k}": v for k, v in metrics.items()}}
