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
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from itpn_ds.config import ConfigError, RunConfig, load_config, save_config, to_dict
from itpn_ds.engine import components, detection, segmentation
from itpn_ds.engine.checkpoint import (CheckpointError, CheckpointManager, CheckpointRef, needs_universal,
                                      read_checkpoint)
from itpn_ds.engine.ds_config import build_ds_config, zero_stage
from itpn_ds.engine.ema import WeightEma
from itpn_ds.engine.export import (WEIGHTS, consolidated_state_dict, export_checkpoint, live_state_dict,
                                   model_metadata, write_export)
from itpn_ds.engine.preemption import PREEMPTED_EXIT_CODE
from itpn_ds.engine.runtime import build_engine, init_distributed, make_deterministic, seed_everything
from itpn_ds.engine.schedule import build_schedule
from itpn_ds.engine.tasks import ClassifyTask, ClipDistillTask, PixelTask, evaluate_classifier
from itpn_ds.engine.trainer import LoopParts, Preempted, Trainer
from itpn_ds.data.shards import Manifest
from itpn_ds.errors import require_free_space, require_writable_dir
from itpn_ds.models.loading import (CheckpointMismatchError, LoadReport, load_target, load_weights,
                                    read_checkpoint_file)

log = logging.getLogger("itpn_ds.engine")


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    if args.command == "export":
        out = export_checkpoint(args.checkpoint, args.out)
        print(f"exported {args.checkpoint} -> {out}")
        return 0
    if args.command == "evaluate":
        cfg = load_config(args.config, args.overrides)
        if cfg.task == "pretrain":  # a pre-training recipe (or none): evaluate as a classifier
            cfg = load_config(args.config, ["task=finetune", *args.overrides])
        return evaluate(cfg, Path(args.checkpoint))
    cfg = load_config(args.config, [f"task={args.command}", *args.overrides])
    return train(cfg, Path(args.run_dir))


def init_source(cfg: RunConfig) -> str:
    """The checkpoint a fine-tuning task starts from (``finetune.init`` / ``segment.init`` / ``detect.init``);
    empty: none."""
    return {"finetune": cfg.finetune.init, "segment": cfg.segment.init, "detect": cfg.detect.init}.get(cfg.task, "")


def train(cfg: RunConfig, run_dir: Path) -> int:
    """Pre-train or fine-tune into ``run_dir``, resuming from its latest checkpoint."""
    runtime = init_distributed()
    make_deterministic()
    seed_everything(cfg.schedule.seed)
    checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep_last, runtime.rank, runtime.world_size)
    resume = checkpoints.latest()
    class_names = _check_segment(cfg) if cfg.task == "segment" else []  # before the resume check: sets num_classes
    check_resumable(cfg, run_dir, resume)
    require_writable_dir(run_dir)
    components.check_trainable_here(cfg, runtime.device)
    components.check_label_range(cfg)
    if cfg.task == "detect":
        detection.check_detection_shards(cfg)
    model = components.build_model(cfg)
    if cfg.task == "detect":
        detection.check_detection_model(cfg, model)
    if cfg.task == "segment":
        segmentation.check_model(cfg, model, runtime.world_size, runtime.device)
        model = segmentation.sync_batch_norm(model, cfg, runtime.world_size, runtime.device)
    require_free_space(run_dir, checkpoint_bytes_estimate(model), "a checkpoint of this model")
    if init_source(cfg) and resume is None:
        init_from(model, init_source(cfg))
    # detection images have their own sizes: no per-image FLOPs, so no MFU
    flops = 0.0 if cfg.task == "detect" else components.forward_flops_per_image(model, cfg)
    ds_config = build_ds_config(cfg, runtime.world_size, num_params=sum(p.numel() for p in model.parameters()))
    stage = zero_stage(ds_config)
    train_loader, eval_loader = components.build_loaders(cfg, runtime.rank, runtime.world_size)
    steps_per_epoch = len(train_loader) // cfg.schedule.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"schedule.grad_accum={cfg.schedule.grad_accum} is more than the {len(train_loader)} "
                          f"micro-batches of an epoch on this rank ({cfg.data.shards}, data.micro_batch="
                          f"{cfg.data.micro_batch}, {runtime.world_size} ranks): lower it or data.micro_batch")
    engine = build_engine(model.to(runtime.device), cfg, runtime, ds_config,
                          load_universal=resume is not None and needs_universal(resume, runtime.world_size, stage))
    if cfg.task == "segment":
        segmentation.norm_buffers_to_param_dtype(engine.module)
    total = steps_per_epoch * cfg.schedule.epochs
    if cfg.schedule.max_steps > 0:
        total = min(total, cfg.schedule.max_steps)
    task = build_task(cfg, runtime.device)
    # accepted: from here on the run writes into run_dir
    checkpoints.remove_incomplete()
    if runtime.rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    tracker = components.tracker_for(cfg, runtime.rank, run_dir, runtime.dist)
    tracker.log_params({**_flat(to_dict(cfg)), **_flat(ds_config, "ds_config.")})  # run config + resolved DeepSpeed JSON
    if runtime.rank == 0:
        tracker.log_artifact(run_dir / "config.yaml")
    ema = WeightEma(engine.module, cfg.finetune.ema_decay) if cfg.task == "finetune" and cfg.finetune.ema_decay > 0 else None
    parts = LoopParts(engine=engine, loader=train_loader, task=task,
                      schedule=build_schedule(cfg.optim, steps_per_epoch, total),
                      checkpoints=checkpoints, tracker=tracker, device=runtime.device, total_steps=total,
                      flops_per_image=flops, ema=ema, eval_every_epochs=cfg.finetune.eval_every_epochs)
    if eval_loader is not None and cfg.task == "detect":
        ground_truth = detection.coco_ground_truth(cfg.data.val_shards) if runtime.rank == 0 else None
        category_ids = Manifest.load(cfg.data.val_shards).category_ids
        parts.evaluate = lambda: detection.evaluate_detector(engine, eval_loader, runtime.device, ground_truth,
                                                             category_ids)
        parts.best_metric, parts.eval_every_epochs = "bbox_AP", cfg.detect.eval_every_epochs
    elif eval_loader is not None and cfg.task == "segment":
        parts.evaluate = lambda: _evaluate_segmenter(engine, eval_loader, cfg, class_names, runtime.device,
                                                     _input_dtype(engine))
    elif eval_loader is not None:
        parts.evaluate = lambda: _evaluate_with_ema(engine, eval_loader, runtime.device, ema)
    if cfg.task == "segment":
        parts.best_metric, parts.eval_every_epochs = segmentation.BEST_METRIC, cfg.segment.eval_every_epochs
    if eval_loader is not None:
        parts.on_best = lambda metrics, step: _export_live(engine, cfg, run_dir / "best", metrics, step, runtime.rank)
    trainer = Trainer(cfg, parts, runtime.rank, runtime.world_size)
    if resume is not None:
        trainer.restore(resume)
    status = "FAILED"
    try:
        metrics = trainer.run()
        if ema is not None:
            with ema.applied():
                _export_live(engine, cfg, run_dir / "ema", metrics, trainer.state.step, runtime.rank)
        status = "FINISHED"
        if runtime.rank == 0 and cfg.tracking.enabled:
            log_exported_model(tracker, run_dir)
        return 0
    except Preempted:
        status = "KILLED"
        return PREEMPTED_EXIT_CODE
    finally:
        tracker.close(status)


def check_resumable(cfg: RunConfig, run_dir: Path, resume: CheckpointRef | None) -> None:
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


def checkpoint_bytes_estimate(model: torch.nn.Module) -> int:
    """Bytes one checkpoint of ``model`` takes at least: fp32 weights and two fp32 AdamW moments."""
    return 3 * 4 * sum(p.numel() for p in model.parameters())


def log_exported_model(tracker: Any, run_dir: Path) -> None:
    """Export the run's final checkpoint (one safetensors + JSON) and hand both files to the tracker."""
    out = export_checkpoint(run_dir, run_dir / "export")
    for name in ("model.safetensors", "config.json"):
        tracker.log_artifact(Path(out) / name, "model")


def evaluate(cfg: RunConfig, checkpoint: Path) -> int:
    """Top-1/top-5 (``task: finetune``), mIoU / mAcc / aAcc and per-class IoU (``task: segment``) or COCO box /
    mask AP (``task: detect``) of a checkpoint (ours, any stage) or an export directory on ``data.val_shards``."""
    runtime = init_distributed()
    if not cfg.data.val_shards:
        raise ConfigError("evaluate needs data.val_shards")
    components.check_label_range(cfg)
    class_names = _check_segment(cfg, train=False) if cfg.task == "segment" else []
    if cfg.task == "detect":
        detection.check_detection_shards(cfg)
    model = components.build_model(cfg)
    if cfg.task == "detect":
        detection.check_detection_model(cfg, model)
    if cfg.task == "segment":
        segmentation.check_model(cfg, model, runtime.world_size, runtime.device)
    init_from(model, str(checkpoint), strict=True)
    model.to(runtime.device)
    _, eval_loader = components.build_loaders(cfg, runtime.rank, runtime.world_size, train=False)
    if cfg.task == "segment":
        metrics = _evaluate_segmenter(model, eval_loader, cfg, class_names, runtime.device, None)
        if runtime.rank == 0:
            print(" ".join(f"{k} {metrics[k]:.4f}" for k in ("mIoU", "mAcc", "aAcc")))
            print(segmentation.format_per_class(metrics))
        return 0
    if cfg.task == "detect":
        ground_truth = detection.coco_ground_truth(cfg.data.val_shards) if runtime.rank == 0 else None
        metrics = detection.evaluate_detector(model, eval_loader, runtime.device, ground_truth,
                                              Manifest.load(cfg.data.val_shards).category_ids)
    else:
        metrics = evaluate_classifier(model, eval_loader, runtime.device, torch.float32)
    if runtime.rank == 0:
        print(" ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def _check_segment(cfg: RunConfig, train: bool = True) -> list[str]:
    """Resolve and check a segment run's class count against its shards; -> the class names."""
    segmentation.resolve_config(cfg)
    return segmentation.check_shards(cfg, train)


def _evaluate_segmenter(model: Any, loader: Any, cfg: RunConfig, class_names: list[str], device: torch.device,
                        autocast_dtype: torch.dtype | None) -> dict[str, float]:
    s = cfg.segment
    return segmentation.evaluate_segmentation(model, loader, device, autocast_dtype, class_names, s.eval_mode,
                                              s.eval_crop, s.eval_stride)


def init_from(model: torch.nn.Module, source: str, strict: bool = False) -> LoadReport:
    """Initialise ``model`` from our checkpoint (any ZeRO stage / world size), an export directory or
    ``.safetensors`` file, or an official ``.pth``, by the one loading rule of ``itpn_ds.models.loading``:
    pre-training-only parts dropped, a classifier's new head left at init, position tables resized,
    anything else that does not fit refused. ``strict`` (evaluation): every model weight must come from
    ``source``. Logs the ``LoadReport``; raises ``CheckpointError`` naming ``source``, the keys and the fix.
    """
    state = read_weights(Path(source))
    target = load_target(model, state)  # a dense task model takes a pre-training run into its backbone
    if strict and target is not model:
        raise CheckpointError(f"{source}: holds no {type(model).__name__} (its heads would stay at their "
                              f"initialisation); give a run of this task or its export")
    try:
        report = load_weights(target, state, strict=strict)
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


def build_task(cfg: RunConfig, device: torch.device) -> Any:
    """The loss of the run's task: segmentation, detection, classification, pixel reconstruction or CLIP
    distillation (with the online teacher on ``device`` when ``teacher.mode=online``)."""
    if cfg.task == "segment":
        return segmentation.SegmentTask(aux_weight=cfg.segment.aux_weight)
    if cfg.task == "detect":
        return detection.DetectTask()
    if cfg.task == "finetune":
        return ClassifyTask(label_smoothing=cfg.finetune.label_smoothing, mixup=components.build_mixup(cfg))
    if cfg.pretrain.objective == "pixel":
        return PixelTask()
    teacher = components.build_online_teacher(cfg, device) if cfg.teacher.mode == "online" else None
    return ClipDistillTask(beta=cfg.pretrain.smooth_l1_beta, aux_weight=cfg.pretrain.aux_weight, teacher=teacher)


def _input_dtype(engine: Any) -> torch.dtype | None:
    """The autocast dtype for evaluation: the engine's parameter dtype when it is not fp32."""
    dtype = next(engine.module.parameters()).dtype
    return None if dtype == torch.float32 else dtype


def _evaluate_with_ema(engine: Any, loader: Any, device: torch.device, ema: WeightEma | None) -> dict[str, float]:
    """Top-1/top-5/loss of the trained weights, plus ``ema_*`` of the averaged weights when there is an EMA."""
    metrics = evaluate_classifier(engine, loader, device, _input_dtype(engine))
    if ema is not None:
        with ema.applied():
            averaged = evaluate_classifier(engine, loader, device, _input_dtype(engine))
        metrics.update({f"ema_{k}": v for k, v in averaged.items() if k != "samples"})
    return metrics


def _export_live(engine: Any, cfg: RunConfig, out: Path, metrics: dict[str, float], step: int, rank: int) -> None:
    """Export the engine's current weights to ``out`` (rank 0 writes; a collective under ZeRO-3): the best
    checkpoint so far (``run_dir/best``) or the weight EMA at the end (``run_dir/ema``)."""
    state = live_state_dict(engine)
    if rank == 0:
        write_export(state, model_metadata(cfg.model.name, cfg.model.kwargs, cfg.task, None, step, out.parent,
                                           metrics=metrics), out)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out
