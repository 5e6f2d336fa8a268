"""What a task brings to the one engine (:class:`TaskFamily`), and the registry of tasks by name.

``commands.train`` and ``commands.evaluate`` are the same for every task; they ask the run's family
(``task_family(cfg)``, the class registered under ``cfg.task``) for the task-specific parts, in this order:

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
5. ``loss(device)``: the per-micro-batch ``Task`` (``itpn_ds.engine.losses``);
6. ``evaluator(model, loader, device, autocast_dtype, ema)``: a call returning the evaluation metrics, all ranks
   together; ``best_metric`` (higher is better) picks ``RUN_DIR/best``, ``eval_every_epochs`` how often;
7. ``report(metrics)``: the lines ``itpn-ds evaluate`` prints.

A task that fine-tunes a checkpoint (:class:`FinetuneFamily`) reads ``init`` and ``eval_every_epochs`` from its
config section, which its ``section()`` returns typed; a task evaluated as another (``evaluated_as``: pre-training,
whose models are evaluated as classifiers) names that one.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from torch import nn

from itpn_ds.data.annotations import CLASSIFICATION, DETECTION, SEGMENTATION
from itpn_ds.data.batch import Loader
from itpn_ds.data.class_map import Alignment, ClassMap, align
from itpn_ds.data.shards import Manifest
from itpn_ds.engine import batch_norm
from itpn_ds.engine.ema import WeightEma
from itpn_ds.engine.losses import Task
from itpn_ds.engine.model import forward_flops_per_image
from itpn_ds.errors import ConfigError

if TYPE_CHECKING:  # config.py imports the task modules: no import of config (nor runtime) at run time
    from itpn_ds.config import RunConfig
    from itpn_ds.engine.runtime import Runtime

log = logging.getLogger("itpn_ds.engine")

Evaluator = Callable[[], dict[str, float]]
Loaders = tuple[Loader | None, Loader | None]


class TaskFamily(ABC):
    """A task's hooks (module docstring); by default only the shards' kind is checked (``shard_kind``; None:
    any), no evaluation, the model as built. Every family names its loaders and its loss. ``name``: the task's
    name (``cfg.task``, the CLI command, its config section), set by :func:`register_task`."""

    name = ""
    best_metric = ""
    shard_kind: str | None = None
    evaluated_as = ""  # the task whose evaluation scores this task's models ("": its own)

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
        return ""

    @property
    def eval_every_epochs(self) -> int:
        return 1

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
            log_rank0(logging.WARNING, "%s stores no class map (made before class maps were stored): %s is evaluated "
                      "by label id, which is right only if its shards number the classes as training's did "
                      "(make-shards --classes-from TRAIN_SHARDS)", self.classes_source, name)
            self.set_trained_classes(split, name)
        alignment = align(self.classes, split, name, self.classes_source)
        if alignment.missing or alignment.renumbers:
            log_rank0(logging.INFO, "%s", alignment.describe(name, self.classes_source))
        return alignment

    def init_has_other_classes(self) -> bool:
        """Whether the run's init checkpoint is a task model trained on another class map than this run's (its
        task head then starts again); False where either stores none."""
        return False

    def prepare_model(self, model: nn.Module, runtime: Runtime, train: bool) -> nn.Module:
        return model

    def flops_per_image(self, model: nn.Module) -> float:
        """Forward FLOPs of one training image (``itpn_ds.models.flops``); 0 when unknown."""
        return forward_flops_per_image(model)

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


class FinetuneSection(Protocol):
    """What the config section of a task that fine-tunes a checkpoint holds (``finetune``, ``segment``,
    ``detect``)."""

    init: str
    eval_every_epochs: int


class FinetuneFamily(TaskFamily):
    """A task that starts from a checkpoint (``<task>.init``) and is evaluated every ``<task>.eval_every_epochs``
    epochs, both read from its config section (``section()``)."""

    @abstractmethod
    def section(self) -> FinetuneSection: ...

    @property
    def init_source(self) -> str:
        return self.section().init

    @property
    def eval_every_epochs(self) -> int:
        return self.section().eval_every_epochs


class DenseSection(FinetuneSection, Protocol):
    """A dense task's section (``segment``, ``detect``): also whether its heads' BatchNorm is synchronised."""

    sync_bn: bool


class DenseFamily(FinetuneFamily):
    """A dense task: its model checked by ``check_model``; in training its heads' BatchNorm as SyncBatchNorm over
    CUDA ranks when ``<task>.sync_bn`` (``engine/batch_norm.py``)."""

    @abstractmethod
    def section(self) -> DenseSection: ...

    @abstractmethod
    def check_model(self, model: nn.Module, runtime: Runtime) -> None: ...

    def prepare_model(self, model: nn.Module, runtime: Runtime, train: bool) -> nn.Module:
        self.check_model(model, runtime)
        if not train:
            return model
        return batch_norm.sync_batch_norm(model, self.section().sync_bn, runtime.world_size, runtime.device,
                                          f"{self.name}.sync_bn")


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


# ------------------------------------------------------------------------------------------------ registry

FAMILIES: dict[str, type[TaskFamily]] = {}


def register_task(name: str) -> Callable[[type[TaskFamily]], type[TaskFamily]]:
    """Class decorator: the family of task ``name`` (``task: name`` in a recipe, ``itpn-ds name``, the config
    section ``name:``)."""

    def register(cls: type[TaskFamily]) -> type[TaskFamily]:
        if name in FAMILIES:
            raise ValueError(f"task {name!r} is registered twice: {FAMILIES[name].__name__} and {cls.__name__}")
        cls.name = name
        FAMILIES[name] = cls
        return cls
    return register


def task_names() -> tuple[str, ...]:
    """The registered tasks, in registration order."""
    return tuple(FAMILIES)


def task_family(cfg: RunConfig) -> TaskFamily:
    """The family of ``cfg.task`` (``config.load_config`` has already refused an unknown task)."""
    return FAMILIES[cfg.task](cfg)


def evaluated_as(task: str) -> str:
    """The task whose evaluation scores the models of ``task`` (pre-training's: classification)."""
    return FAMILIES[task].evaluated_as or task


def global_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def log_rank0(level: int, message: str, *args: Any) -> None:
    """A log line of rank 0 only (every rank reads the same maps)."""
    if global_rank() == 0:
        log.log(level, message, *args)
