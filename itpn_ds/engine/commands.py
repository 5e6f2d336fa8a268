"""``itpn-ds pretrain | finetune | segment | evaluate | export``.

    itpn-ds pretrain --config RECIPE --run-dir DIR [key=value ...]
    itpn-ds finetune --config RECIPE --run-dir DIR finetune.init=PRETRAIN_RUN [key=value ...]
    itpn-ds segment  --config RECIPE --run-dir DIR segment.init=PRETRAIN_RUN [key=value ...]
    itpn-ds detect   --config RECIPE --run-dir DIR detect.init=PRETRAIN_RUN [key=value ...]
    itpn-ds evaluate --config RECIPE --checkpoint CKPT [key=value ...]   (the recipe's task: finetune, segment or detect)
    itpn-ds export   --checkpoint CKPT --out DIR

Exit codes: 0 done, 2 configuration error, PREEMPTED_EXIT_CODE (85) checkpoint saved after a preemption
signal (the SLURM wrapper requeues), 1 anything else.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from itpn_ds.config import ConfigError, RunConfig, load_config, save_config, to_dict
from itpn_ds.data.class_map import ClassMap
from itpn_ds.engine.broadcast import SOURCE_RANK, ReadMeter, broadcast_module, on_source_rank
from itpn_ds.engine.checkpoint import (CheckpointError, CheckpointManager, CheckpointRef, needs_universal,
                                      read_checkpoint)
from itpn_ds.engine.ds_config import build_ds_config, zero_stage
from itpn_ds.engine.export import (WEIGHTS, consolidated_state_dict, export_checkpoint, live_state_dict,
                                   model_metadata, stored_class_map, write_export)
from itpn_ds.engine.model import build_model, check_trainable_here
from itpn_ds.engine.preemption import PREEMPTED_EXIT_CODE
from itpn_ds.engine.probe import build_probe, curve_metrics
from itpn_ds.engine.runtime import build_engine, init_distributed, make_deterministic, seed_everything
from itpn_ds.engine.schedule import BatchPlan, batch_plan, build_schedule, with_batch_plan
from itpn_ds.engine.tasks import evaluated_as, task_family
from itpn_ds.engine.trainer import LoopParts, Preempted, Trainer
from itpn_ds.errors import require_free_space, require_writable_dir
from itpn_ds.models.loading import (CheckpointMismatchError, LoadReport, load_target, load_weights,
                                    read_checkpoint_file)
from itpn_ds.tracking import build_tracker
from itpn_ds.tracking.base import Tracker

log = logging.getLogger("itpn_ds.engine")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # every line names its logger


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "export":
        parser.add_argument("--checkpoint", required=True, help="run directory, its checkpoints/ or a step_N dir")
        parser.add_argument("--out", required=True, help="output directory (model.safetensors + config.json)")
        return
    parser.add_argument("--config", default=None, help="recipe name (itpn_ds/recipes) or YAML path")
    if command == "evaluate":
        parser.add_argument("--checkpoint", required=True, help="checkpoint or export directory to evaluate")
    else:
        parser.add_argument("--run-dir", required=True, help="run directory: config, checkpoints, logs")
    parser.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys (optim.lr=1e-3)")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    if args.command == "export":
        out = export_checkpoint(args.checkpoint, args.out)
        print(f"exported {args.checkpoint} -> {out}")
        return 0
    if args.command == "evaluate":
        cfg = load_config(args.config, args.overrides)
        task = evaluated_as(cfg.task)  # a pre-training recipe (or none): evaluated as a classifier
        if task != cfg.task:
            cfg = load_config(args.config, [f"task={task}", *args.overrides])
        return evaluate(cfg, Path(args.checkpoint))
    cfg = load_config(args.config, [f"task={args.command}", *args.overrides])
    return train(cfg, Path(args.run_dir))


def train(cfg: RunConfig, run_dir: Path) -> int:
    """Pre-train or fine-tune into ``run_dir``, resuming from its latest checkpoint; the task's parts come from
    its family (``itpn_ds.engine.tasks``)."""
    runtime = init_distributed()
    log_tracking_target(cfg, run_dir, runtime.rank)
    asked = cfg  # config.yaml keeps the recipe's batch settings, which any world size resolves again
    plan = batch_plan(cfg, runtime.world_size)
    cfg = with_batch_plan(cfg, plan)
    make_deterministic()
    seed_everything(cfg.schedule.seed)
    family = task_family(cfg)
    checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep_last, runtime.rank, runtime.world_size)
    resume = checkpoints.latest()
    family.check(train=True)
    check_resumable(cfg, run_dir, resume, plan)
    if runtime.rank == 0:
        log.info("batch: %s; optim.lr %g as given (never rescaled with the batch)", plan.describe(), cfg.optim.lr)
    require_writable_dir(run_dir)
    check_trainable_here(cfg, runtime.device)
    model = family.prepare_model(build_model(cfg), runtime, train=True)
    probe = build_probe(cfg, runtime.rank, runtime.world_size, runtime.device, model)
    require_free_space(run_dir, checkpoint_bytes_estimate(model), "a checkpoint of this model")
    if family.init_source and resume is None:
        init_from(model, family.init_source, new_head=family.init_has_other_classes())
    flops = family.flops_per_image(model)
    ds_config = build_ds_config(cfg, runtime.world_size, num_params=sum(p.numel() for p in model.parameters()))
    stage = zero_stage(ds_config)
    train_loader, eval_loader = family.loaders(runtime.rank, runtime.world_size, train=True)
    steps_per_epoch = len(train_loader) // cfg.schedule.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"schedule.grad_accum={cfg.schedule.grad_accum} is more than the {len(train_loader)} "
                          f"micro-batches of an epoch on this rank ({cfg.data.shards}, data.micro_batch="
                          f"{cfg.data.micro_batch}, {runtime.world_size} ranks): lower it or data.micro_batch")
    engine = build_engine(model.to(runtime.device), cfg, runtime, ds_config,
                          load_universal=resume is not None and needs_universal(resume, runtime.world_size, stage))
    family.after_engine(engine)
    total = steps_per_epoch * cfg.schedule.epochs
    if cfg.schedule.max_steps > 0:
        total = min(total, cfg.schedule.max_steps)
    task = family.loss(runtime.device)
    # accepted: from here on the run writes into run_dir
    checkpoints.remove_incomplete()
    if runtime.rank == 0:
        save_config(asked, run_dir / "config.yaml")
    tracker = run_tracker(cfg, runtime.rank, run_dir, runtime.dist)
    tracker.log_params({**_flat(to_dict(cfg)), **_flat(ds_config, "ds_config.")})  # run config + resolved DeepSpeed JSON
    if runtime.rank == 0:
        tracker.log_artifact(run_dir / "config.yaml")
        log_class_map(tracker, family.classes, run_dir)
    ema = family.weight_ema(engine.module)
    parts = LoopParts(engine=engine, loader=train_loader, task=task,
                      schedule=build_schedule(cfg.optim, steps_per_epoch, total),
                      checkpoints=checkpoints, tracker=tracker, device=runtime.device, total_steps=total,
                      flops_per_image=flops, ema=ema, best_metric=family.best_metric,
                      eval_every_epochs=family.eval_every_epochs, classes=family.classes, probe=probe)
    if eval_loader is not None:
        parts.evaluate = family.evaluator(engine, eval_loader, runtime.device, _input_dtype(engine), ema)
        parts.on_best = lambda metrics, step: _export_live(engine, cfg, run_dir / "best", metrics, step, runtime.rank,
                                                           family.classes)
    trainer = Trainer(cfg, parts, runtime.rank, runtime.world_size)
    if resume is not None:
        trainer.restore(resume)
    status = "FAILED"
    try:
        metrics = trainer.run()
        if ema is not None:
            with ema.applied():
                _export_live(engine, cfg, run_dir / "ema", metrics, trainer.state.step, runtime.rank, family.classes)
        status = "FINISHED"
        if runtime.rank == 0 and cfg.tracking.enabled:
            log_exported_model(tracker, run_dir)
        return 0
    except Preempted:
        status = "KILLED"
        return PREEMPTED_EXIT_CODE
    finally:
        tracker.close(status)


def check_resumable(cfg: RunConfig, run_dir: Path, resume: CheckpointRef | None, plan: BatchPlan) -> None:
    """Refuse, before anything is written, to continue a run directory that holds another run: its latest
    checkpoint was made for another task or model, or ``checkpoint.resume=never``."""
    if resume is None:
        return
    if cfg.checkpoint.resume == "never":
        raise ConfigError(f"{run_dir} already holds checkpoint {resume.path} and checkpoint.resume=never: "
                          "choose a new --run-dir")
    theirs = resume.meta.get("model", {})
    ours = {"name": cfg.model.name, "kwargs": cfg.model.kwargs}
    if resume.meta.get("task") != cfg.task or theirs != ours:
        raise ConfigError(f"{run_dir} holds checkpoints of another run (task {resume.meta.get('task')}, model "
                          f"{theirs.get('name')} {theirs.get('kwargs')}), not of this one (task {cfg.task}, model "
                          f"{cfg.model.name} {cfg.model.kwargs}): choose a new --run-dir")
    trained = trained_global_batch(resume.meta)
    if trained is not None and trained != plan.global_batch:
        raise ConfigError(f"{resume.path} was trained at global batch {trained} ({resume.meta['world_size']} ranks) but "
                          f"this run takes {plan.global_batch} per step ({plan.describe()}): set "
                          f"schedule.global_batch={trained} to keep it by gradient accumulation, or start a new --run-dir")


def trained_global_batch(meta: dict[str, Any]) -> int | None:
    """The global batch a checkpoint's steps were taken at (None when its meta does not say)."""
    saved = meta.get("config", {}).get("schedule", {})
    if saved.get("global_batch"):
        return int(saved["global_batch"])
    micro = meta.get("config", {}).get("data", {}).get("micro_batch")
    if micro is None or "world_size" not in meta:
        return None
    return int(micro) * int(saved.get("grad_accum") or 1) * int(meta["world_size"])


def checkpoint_bytes_estimate(model: torch.nn.Module) -> int:
    """Bytes one checkpoint of ``model`` takes at least: fp32 weights and two fp32 AdamW moments."""
    return 3 * 4 * sum(p.numel() for p in model.parameters())


def log_class_map(tracker: Any, classes: ClassMap | None, run_dir: Path) -> None:
    """The class map trained, on the tracked run: its size as the parameter ``classes.count`` and the map itself
    as the artifact ``classes.json`` (written into ``run_dir``; a thousand names outgrow a parameter)."""
    if classes is None:
        return
    tracker.log_params({"classes.count": len(classes)})
    path = run_dir / "classes.json"
    path.write_text(json.dumps(classes.to_json(), indent=1))
    tracker.log_artifact(path)


def log_exported_model(tracker: Any, run_dir: Path) -> None:
    """Export the run's final checkpoint (one safetensors + JSON) and hand both files to the tracker."""
    out = export_checkpoint(run_dir, run_dir / "export")
    for name in ("model.safetensors", "config.json"):
        tracker.log_artifact(Path(out) / name, "model")


def evaluate(cfg: RunConfig, checkpoint: Path) -> int:
    """Top-1/top-5 (``task: finetune``), mIoU / mAcc / aAcc and per-class IoU (``task: segment``) or COCO box /
    mask AP (``task: detect``) of a checkpoint (ours, any stage) or an export directory on ``data.val_shards``,
    in fp32. The split's classes are compared by name with those stored with the weights, before any work."""
    runtime = init_distributed()
    if not cfg.data.val_shards:
        raise ConfigError("evaluate needs data.val_shards")
    family = task_family(cfg)
    family.set_trained_classes(stored_class_map(checkpoint), str(checkpoint))
    family.check(train=False)
    with tempfile.TemporaryDirectory(prefix="itpn-ds-evaluate-") as journal:
        tracking = dataclasses.replace(cfg.tracking, buffer_dir=cfg.tracking.buffer_dir or journal,
                                       run_name=cfg.tracking.run_name or f"evaluate {checkpoint.resolve().name}",
                                       curve_metrics=(f"eval/{family.best_metric}",))
        tracked = dataclasses.replace(cfg, tracking=tracking)
        log_tracking_target(tracked, checkpoint, runtime.rank)
        tracker = run_tracker(tracked, runtime.rank, Path(journal), runtime.dist)
        status = "FAILED"
        try:
            tracker.set_tags({"itpn_ds.command": "evaluate", "checkpoint": str(checkpoint.resolve())})
            tracker.log_params(_flat(to_dict(cfg)))
            model = family.prepare_model(build_model(cfg), runtime, train=False)
            init_from(model, str(checkpoint), strict=True)
            model.to(runtime.device)
            _, eval_loader = family.loaders(runtime.rank, runtime.world_size, train=False)
            metrics = family.evaluator(model, eval_loader, runtime.device, None, None)()
            tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=0)
            status = "FINISHED"
        finally:
            tracker.close(status)
    if runtime.rank == 0:
        print(family.report(metrics))
    return 0


def run_tracker(cfg: RunConfig, rank: int, run_dir: Path, dist_env: Any) -> Tracker:
    """The run's tracker (``itpn_ds.tracking``); with the probe on, its top-1 curves are drawn beside the loss."""
    curves = (*cfg.tracking.curve_metrics, *curve_metrics(cfg.probe))
    return build_tracker(dataclasses.replace(cfg.tracking, curve_metrics=curves), rank, run_dir, dist_env)


def log_tracking_target(cfg: RunConfig, run_dir: Path, rank: int) -> None:
    """The first line a run logs: where it is tracked (or that it is not)."""
    if rank == 0:
        log.info(cfg.tracking.describe(run_dir))


def init_from(model: torch.nn.Module, source: str, strict: bool = False, new_head: bool = False) -> LoadReport:
    """Initialise ``model`` from our checkpoint (any ZeRO stage / world size), an export directory or
    ``.safetensors`` file, or an official ``.pth``, by the one loading rule of ``itpn_ds.models.loading``:
    pre-training-only parts dropped, a classifier's new head left at init (``new_head``: also one of the same
    shape, trained on other classes), position tables resized, anything else that does not fit refused.
    ``strict`` (evaluation): every model weight must come from ``source``. Raises ``CheckpointError`` naming
    ``source``, the keys and the fix, on every rank.

    One read per job: rank 0 reads ``source`` and loads it (logging what it read and the ``LoadReport``), the
    other ranks receive the loaded weights by broadcast (``itpn_ds.engine.broadcast``).
    """
    report = on_source_rank(lambda: load_on_this_rank(model, source, strict, new_head))
    with ReadMeter() as meter:
        received = broadcast_module(model)
    if received and dist.get_rank() != SOURCE_RANK:
        log.info("rank %d received the initial weights of %s from rank %d: %.1f MB in %.2f s", dist.get_rank(),
                 source, SOURCE_RANK, received / 1e6, meter.seconds)
    return report


def load_on_this_rank(model: torch.nn.Module, source: str, strict: bool, new_head: bool) -> LoadReport:
    """``init_from``'s read and load, on the calling rank alone."""
    with ReadMeter() as meter:
        state = read_weights(Path(source))
    log.info("rank %d read %s: %s in %.1f s", dist.get_rank() if dist.is_initialized() else 0, source,
             "?" if meter.bytes < 0 else f"{meter.bytes / 1e6:.1f} MB", meter.seconds)
    target = load_target(model, state)  # a dense task model takes a pre-training run into its backbone
    if strict and target is not model:
        raise CheckpointError(f"{source}: holds no {type(model).__name__} (its heads would stay at their "
                              f"initialisation); give a run of this task or its export")
    try:
        report = load_weights(target, state, strict=strict, new_head=new_head)
    except CheckpointMismatchError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    log.info("initialised %s from %s: %s", type(target).__name__, source, report.summary())
    return report


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` / ``.safetensors`` file, an export directory, or a checkpoint of ours
    (its fp32 weights consolidated from any ZeRO stage)."""
    if path.is_file():
        return read_checkpoint_file(path)
    if (path / WEIGHTS).is_file():
        return read_checkpoint_file(path / WEIGHTS)
    return consolidated_state_dict(read_checkpoint(path))


def _input_dtype(engine: Any) -> torch.dtype | None:
    """The autocast dtype for evaluation: the engine's parameter dtype when it is not fp32."""
    dtype = next(engine.module.parameters()).dtype
    return None if dtype == torch.float32 else dtype


def _export_live(engine: Any, cfg: RunConfig, out: Path, metrics: dict[str, float], step: int, rank: int,
                 classes: ClassMap | None) -> None:
    """Export the engine's current weights and the class map trained to ``out`` (rank 0 writes; a collective
    under ZeRO-3): the best checkpoint so far (``run_dir/best``) or the weight EMA at the end (``run_dir/ema``)."""
    state = live_state_dict(engine)
    if rank == 0:
        write_export(state, model_metadata(cfg.model.name, cfg.model.kwargs, cfg.task, None, step, out.parent,
                                           metrics=metrics, **(classes.to_json() if classes else {})), out)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out
