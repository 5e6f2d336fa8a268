"""What each task (``cfg.task``) brings to the one engine: its checks, loaders, loss and evaluation.

``commands.train`` and ``commands.evaluate`` are the same for every task; they ask the run's
:class:`TaskFamily` (``task_family(cfg)``) for the task-specific parts, in this order:

1. ``check(train)``: the configuration against the shards, before anything is built or written (a
   segmentation run also takes its class count and names from here);
2. ``prepare_model(model, runtime, train)``: model checks, and the model the engine wraps (the dense heads'
   SyncBatchNorm, ``engine/batch_norm.py``);
3. ``loaders(rank, world_size, train)``: (train loader, eval loader);
4. ``after_engine(engine)``: what the DeepSpeed-wrapped model needs (BatchNorm buffers in the weights' dtype);
   ``weight_ema(module)``: the weight EMA a classifier keeps;
5. ``loss(device)``: the per-micro-batch ``Task`` (``itpn_ds.engine.tasks``);
6. ``evaluator(model, loader, device, autocast_dtype, ema)``: a call returning the evaluation metrics, all ranks
   together; ``best_metric`` (higher is better) picks ``RUN_DIR/best``, ``eval_every_epochs`` how often;
7. ``report(metrics)``: the lines ``itpn-ds evaluate`` prints.

Families: ``pretrain`` (CLIP distillation or pixel reconstruction; no evaluation), ``finetune`` (classification:
top-1 / top-5), ``segment`` (UperNet: mIoU, ``engine/segmentation.py``), ``detect`` (Mask R-CNN: COCO AP,
``engine/detection.py``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import nn

from itpn_ds.config import ConfigError, RunConfig
from itpn_ds.data.annotations import CLASSIFICATION, DETECTION, SEGMENTATION
from itpn_ds.data.batch import Loader
from itpn_ds.data.shards import Manifest
from itpn_ds.engine import batch_norm, components, detection, segmentation
from itpn_ds.engine.ema import WeightEma
from itpn_ds.engine.runtime import Runtime
from itpn_ds.engine.tasks import ClassifyTask, ClipDistillTask, PixelTask, Task, evaluate_classifier

Evaluator = Callable[[], dict[str, float]]
Loaders = tuple[Loader | None, Loader | None]


class TaskFamily(ABC):
    """A task's hooks (module docstring); by default only the shards' kind is checked (``shard_kind``; None:
    any), no evaluation, the model as built. Every family names its loaders and its loss."""

    best_metric = ""
    shard_kind: str | None = None
    section: str | None = None  # the config section with the task's ``init`` and ``eval_every_epochs``

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._manifests: dict[str, Manifest] = {}

    def manifests(self, train: bool) -> dict[str, Manifest]:
        """The manifests of ``data.shards`` (with ``train``) and ``data.val_shards``, those set, by key; each read
        once per run, however many checks look at it."""
        keys = ("shards", "val_shards") if train else ("val_shards",)
        for key in keys:
            if getattr(self.cfg.data, key) and key not in self._manifests:
                self._manifests[key] = Manifest.load(getattr(self.cfg.data, key))
        return {key: self._manifests[key] for key in keys if key in self._manifests}

    @property
    def init_source(self) -> str:
        """The checkpoint the run starts from (``finetune.init``, ``segment.init``, ...); empty: none."""
        return getattr(self.cfg, self.section).init if self.section else ""

    @property
    def eval_every_epochs(self) -> int:
        return getattr(self.cfg, self.section).eval_every_epochs if self.section else 1

    def check(self, train: bool) -> None:
        if self.shard_kind is not None:
            check_shard_kind(self.cfg, self.shard_kind, self.manifests(train))

    def prepare_model(self, model: nn.Module, runtime: Runtime, train: bool) -> nn.Module:
        return model

    def flops_per_image(self, model: nn.Module) -> float:
        """Forward FLOPs of one training image (``itpn_ds.models.flops``); 0 when unknown."""
        return components.forward_flops_per_image(model)

    @abstractmethod
    def loaders(self, rank: int, world_size: int, train: bool) -> Loaders: ...

    def after_engine(self, engine: Any) -> None:
        pass

    def weight_ema(self, module: nn.Module) -> WeightEma | None:
        """The EMA of the trained weights the run keeps (evaluated and exported beside them); None: none."""
        return None

    @abstractmethod
    def loss(self, device: torch.device) -> Task: ...

    def evaluator(self, model: Any, loader: Loader, device: torch.device, autocast_dtype: torch.dtype | None,
                  ema: WeightEma | None) -> Evaluator | None:
        return None

    def report(self, metrics: dict[str, float]) -> str:
        return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


class PretrainFamily(TaskFamily):
    """CLIP distillation (cached or online teacher) or pixel reconstruction; nothing to evaluate."""

    def prepare_model(self, model: nn.Module, runtime: Runtime, train: bool) -> nn.Module:
        components.check_objective(self.cfg, model)
        return model

    def loaders(self, rank: int, world_size: int, train: bool) -> Loaders:
        return (components.build_pretrain_loader(self.cfg, rank, world_size) if train else None), None

    def loss(self, device: torch.device) -> Task:
        cfg = self.cfg
        if cfg.pretrain.objective == "pixel":
            return PixelTask()
        teacher = components.build_online_teacher(cfg, device) if cfg.teacher.mode == "online" else None
        return ClipDistillTask(beta=cfg.pretrain.smooth_l1_beta, aux_weight=cfg.pretrain.aux_weight, teacher=teacher)


class ClassifyFamily(TaskFamily):
    """Image classification: cross-entropy with mixup / cutmix, top-1 / top-5 of the weights and their EMA."""

    best_metric = "top1"
    shard_kind = CLASSIFICATION
    section = "finetune"

    def check(self, train: bool) -> None:
        super().check(train)
        components.check_label_range(self.cfg, self.manifests(train=True))  # the training labels even in evaluate

    def loaders(self, rank: int, world_size: int, train: bool) -> Loaders:
        return components.build_classification_loaders(self.cfg, rank, world_size, train)

    def loss(self, device: torch.device) -> Task:
        ft = self.cfg.finetune
        return ClassifyTask(label_smoothing=ft.label_smoothing, mixup=components.build_mixup(self.cfg))

    def weight_ema(self, module: nn.Module) -> WeightEma | None:
        decay = self.cfg.finetune.ema_decay
        return WeightEma(module, decay) if decay > 0 else None

    def evaluator(self, model: Any, loader: Loader, device: torch.device, autocast_dtype: torch.dtype | None,
                  ema: WeightEma | None) -> Evaluator:
        def evaluate() -> dict[str, float]:
            metrics = evaluate_classifier(model, loader, device, autocast_dtype)
            if ema is not None:
                with ema.applied():
                    averaged = evaluate_classifier(model, loader, device, autocast_dtype)
                metrics.update({f"ema_{k}": v for k, v in averaged.items() if k != "samples"})
            return metrics
        return evaluate


class DenseFamily(TaskFamily):
    """A dense task: its model checked by ``check_model``; in training its heads' BatchNorm as SyncBatchNorm over
    CUDA ranks when ``<section>.sync_bn`` (``engine/batch_norm.py``)."""

    @abstractmethod
    def check_model(self, model: nn.Module, runtime: Runtime) -> None: ...

    def prepare_model(self, model: nn.Module, runtime: Runtime, train: bool) -> nn.Module:
        self.check_model(model, runtime)
        if not train:
            return model
        return batch_norm.sync_batch_norm(model, getattr(self.cfg, self.section).sync_bn, runtime.world_size,
                                          runtime.device, f"{self.section}.sync_bn")


class SegmentFamily(DenseFamily):
    """Semantic segmentation (UperNet + FCN): mIoU / mAcc / aAcc and per-class IoU (``engine/segmentation.py``)."""

    best_metric = segmentation.BEST_METRIC
    shard_kind = SEGMENTATION
    section = "segment"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.class_names: list[str] = []

    def check(self, train: bool) -> None:
        super().check(train)
        segmentation.resolve_config(self.cfg)  # sets model.kwargs.num_classes, so before the resume check
        self.class_names = segmentation.check_shards(self.cfg, self.manifests(train))

    def check_model(self, model: nn.Module, runtime: Runtime) -> None:
        segmentation.check_model(self.cfg, model, runtime.world_size, runtime.device)

    def flops_per_image(self, model: nn.Module) -> float:
        return components.forward_flops_per_image(model, self.cfg.segment.crop_size)

    def loaders(self, rank: int, world_size: int, train: bool) -> Loaders:
        return segmentation.build_loaders(self.cfg, rank, world_size, train)

    def after_engine(self, engine: Any) -> None:
        batch_norm.norm_buffers_to_param_dtype(engine.module)

    def loss(self, device: torch.device) -> Task:
        return segmentation.SegmentTask(aux_weight=self.cfg.segment.aux_weight)

    def evaluator(self, model: Any, loader: Loader, device: torch.device, autocast_dtype: torch.dtype | None,
                  ema: WeightEma | None) -> Evaluator:
        s = self.cfg.segment
        return lambda: segmentation.evaluate_segmentation(model, loader, device, autocast_dtype, self.class_names,
                                                          s.eval_mode, s.eval_crop, s.eval_stride)

    def report(self, metrics: dict[str, float]) -> str:
        return (" ".join(f"{k} {metrics[k]:.4f}" for k in ("mIoU", "mAcc", "aAcc")) + "\n"
                + segmentation.format_per_class(metrics))


class DetectFamily(DenseFamily):
    """Detection and instance segmentation (Mask R-CNN): COCO box / mask AP (``engine/detection.py``)."""

    best_metric = "bbox_AP"
    shard_kind = DETECTION
    section = "detect"

    def check(self, train: bool) -> None:
        super().check(train)
        detection.check_detection_shards(self.cfg, self.manifests(train=True))

    def check_model(self, model: nn.Module, runtime: Runtime) -> None:
        detection.check_detection_model(self.cfg, model, self.manifests(train=True))

    def flops_per_image(self, model: nn.Module) -> float:
        return 0.0  # images of their own sizes: no per-image FLOPs, so no MFU

    def loaders(self, rank: int, world_size: int, train: bool) -> Loaders:
        return detection.build_detection_loaders(self.cfg, rank, world_size, train)

    def loss(self, device: torch.device) -> Task:
        return detection.DetectTask()

    def evaluator(self, model: Any, loader: Loader, device: torch.device, autocast_dtype: torch.dtype | None,
                  ema: WeightEma | None) -> Evaluator:
        shards = self.cfg.data.val_shards
        # only rank 0 scores, so only rank 0 reads the ground truth
        ground_truth = detection.coco_ground_truth(shards) if _rank() == 0 else None
        category_ids = self.manifests(train=False)["val_shards"].category_ids
        return lambda: detection.evaluate_detector(model, loader, device, ground_truth, category_ids)


MAKE_SHARDS = {CLASSIFICATION: "itpn-ds make-shards IMAGES OUT",
               SEGMENTATION: "itpn-ds make-shards IMAGES OUT --kind segmentation --annotations LABEL_MAPS "
                             "--class-names FILE",
               DETECTION: "itpn-ds make-shards IMAGES OUT --kind detection --annotations instances.json"}


def check_shard_kind(cfg: RunConfig, kind: str, manifests: dict[str, Manifest]) -> None:
    """The shards ``manifests`` (``data.<key>`` -> ``Manifest``) must be of ``kind``; refused naming the key, the
    directory, its kind and the make-shards command for the right one."""
    for key, manifest in manifests.items():
        if manifest.kind != kind:
            raise ConfigError(f"data.{key}={getattr(cfg.data, key)} holds {manifest.kind} shards; task={cfg.task} "
                              f"needs {kind} shards ({MAKE_SHARDS[kind]})")


FAMILIES: dict[str, type[TaskFamily]] = {"pretrain": PretrainFamily, "finetune": ClassifyFamily,
                                         "segment": SegmentFamily, "detect": DetectFamily}


def task_family(cfg: RunConfig) -> TaskFamily:
    """The family of ``cfg.task`` (``config.load_config`` has already refused an unknown task)."""
    return FAMILIES[cfg.task](cfg)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
