"""What each task (``cfg.task``) brings to the one engine: its checks, loaders, loss and evaluation.

``commands.train`` and ``commands.evaluate`` are the same for every task; they ask the run's
:class:`TaskFamily` (``task_family(cfg)``) for the task-specific parts, in this order:

1. ``check(train)``: the configuration against the shards, before anything is built or written: the shards'
   kind, and the class maps by name (``itpn_ds.data.class_map``): the map trained (``classes``: data.shards'
   in training, the one stored with the weights in evaluation, ``set_trained_classes``) against
   data.val_shards' (``alignment``: its labels in training's ids); a segmentation run also takes its class count
   and names from here;
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

import logging
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import nn

from itpn_ds.config import ConfigError, RunConfig
from itpn_ds.data.annotations import CLASSIFICATION, DETECTION, SEGMENTATION
from itpn_ds.data.batch import Loader
from itpn_ds.data.class_map import Alignment, ClassMap, align, short_list
from itpn_ds.data.shards import Manifest
from itpn_ds.engine import batch_norm, components, detection, segmentation
from itpn_ds.engine.ema import WeightEma
from itpn_ds.engine.export import stored_class_map
from itpn_ds.engine.runtime import Runtime
from itpn_ds.engine.tasks import ClassifyTask, ClipDistillTask, PixelTask, Task, evaluate_classifier

log = logging.getLogger("itpn_ds.engine")

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
        self.classes: ClassMap | None = None  # the class map trained (None: pre-training, or not stored)
        self.classes_source = ""              # where it comes from, for messages
        self.alignment: Alignment | None = None  # data.val_shards' labels in training's ids

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

    def set_trained_classes(self, classes: ClassMap | None, source: str) -> None:
        """Evaluation: the class map stored with the weights at ``source``; None where none is stored."""
        self.classes, self.classes_source = classes, source

    def check(self, train: bool) -> None:
        if self.shard_kind is None:
            return
        manifests = self.manifests(train)
        check_shard_kind(self.cfg, self.shard_kind, manifests)
        if train and "shards" in manifests:
            self.set_trained_classes(ClassMap.of_manifest(manifests["shards"]), f"data.shards={self.cfg.data.shards}")
        if "val_shards" in manifests and (self.classes is not None or not train):
            self.alignment = self.align_val(manifests["val_shards"])

    def align_val(self, manifest: Manifest) -> Alignment:
        """data.val_shards' labels in the ids of the map trained, by name (refused naming a class training does
        not have; one log line when the split is not numbered exactly as training). Weights that store no map are
        evaluated by label id, with a warning naming the risk."""
        split, name = ClassMap.of_manifest(manifest), f"data.val_shards={self.cfg.data.val_shards}"
        if self.classes is None:
            _log(logging.WARNING, "%s stores no class map (made before class maps were stored): %s is evaluated by "
                 "label id, which is right only if its shards number the classes as training's did (make-shards "
                 "--classes-from TRAIN_SHARDS)", self.classes_source, name)
            self.set_trained_classes(split, name)
        alignment = align(self.classes, split, name, self.classes_source)
        if alignment.missing or alignment.renumbers:
            _log(logging.INFO, "%s", alignment.describe(name, self.classes_source))
        return alignment

    def init_has_other_classes(self) -> bool:
        """Whether the run's init checkpoint is a task model trained on another class map than this run's (its
        task head then starts again); False where either stores none."""
        return False

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

    def init_has_other_classes(self) -> bool:
        theirs = stored_class_map(self.init_source)
        if theirs is None or self.classes is None or list(theirs.ids.items()) == list(self.classes.ids.items()):
            return False
        _log(logging.WARNING, "finetune.init=%s was trained on other classes (%d: %s) than %s (%d: %s): its "
             "classification head is re-initialised", self.init_source, len(theirs), short_list(theirs.names),
             self.classes_source, len(self.classes), short_list(self.classes.names))
        return True

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
        table = self.alignment.label_table() if self.alignment is not None and self.alignment.renumbers else None

        def evaluate() -> dict[str, float]:
            metrics = evaluate_classifier(model, loader, device, autocast_dtype, table)
            if ema is not None:
                with ema.applied():
                    averaged = evaluate_classifier(model, loader, device, autocast_dtype, table)
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
        self.class_names = segmentation.check_class_count(self.cfg, self.classes, self.classes_source)

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
                                                          s.eval_mode, s.eval_crop, s.eval_stride, self.alignment)

    def report(self, metrics: dict[str, float]) -> str:
        return (" ".join(f"{k} {metrics[k]:.4f}" for k in ("mIoU", "mAcc", "aAcc")) + "\n"
                + segmentation.format_per_class(metrics))


class DetectFamily(DenseFamily):
    """Detection and instance segmentation (Mask R-CNN): COCO box / mask AP (``engine/detection.py``)."""

    best_metric = "bbox_AP"
    shard_kind = DETECTION
    section = "detect"

    def check_model(self, model: nn.Module, runtime: Runtime) -> None:
        detection.check_detection_model(self.cfg, model, self.classes, self.classes_source)

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
        split = ClassMap.of_manifest(self.manifests(train=False)["val_shards"])
        category_ids = detection.split_category_ids(self.classes, split)
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


def _log(level: int, message: str, *args: Any) -> None:
    """A log line of rank 0 only (every rank reads the same maps)."""
    if _rank() == 0:
        log.log(level, message, *args)
