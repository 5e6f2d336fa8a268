"""Typed run configuration: dataclasses per component, YAML recipes over the defaults, dotted overrides.

A run is described by :class:`RunConfig`. A recipe is a YAML file holding only what differs from the
defaults (``itpn_ds/recipes/NAME.yaml``, or any path); ``key=value`` overrides with dotted keys
(``optim.lr=1e-3``, ``data.micro_batch=32``) are applied on top, values parsed as YAML. Unknown keys and
values of the wrong type are rejected with the full dotted key. The resolved configuration is written
into the run directory (``config.yaml``) so a run can be repeated from it alone.

The generic machinery (``from_dict``, ``to_dict``, ``apply_overrides``) works on any dataclass, so the
components' own configs compose in without change: ``TrackingConfig`` (``itpn_ds.tracking``), ``ProbeConfig``
(``engine/probe.py``) and the task sections ``pretrain``, ``finetune``, ``segment``, ``detect``, each defined by
its task module (``itpn_ds.engine.tasks``). This module keeps the run-level sections.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from itpn_ds.engine.probe import ProbeConfig
from itpn_ds.engine.tasks import task_names
from itpn_ds.engine.tasks.classify import FinetuneConfig
from itpn_ds.engine.tasks.detect import DetectConfig
from itpn_ds.engine.tasks.pretrain import PretrainConfig
from itpn_ds.engine.tasks.segment import SegmentConfig
from itpn_ds.errors import ConfigError, FieldError, check_choice
from itpn_ds.tracking.config import TrackingConfig

RECIPES_DIR = Path(__file__).parent / "recipes"

TASKS = task_names()  # each task module of itpn_ds.engine.tasks registers its own
TEACHER_MODES = ("cache", "online")
PRECISIONS = ("bf16", "fp16", "fp32")
CHECKPOINTING_POLICIES = ("off", "every", "every_k")
ATTENTION_BACKENDS = ("sdpa", "flex")
COMPILE_MODES = ("off", "on")
OPTIMIZERS = ("auto", "adamw", "adamw_fused", "fused_adam", "cpu_adam")
RESUME_POLICIES = ("auto", "never")
LR_SCHEDULES = ("cosine", "poly", "step")
# the model's own layers, or the published dense constructors' (det/ and seg/mmcv_custom of sunsmarterjie/iTPN)
LAYER_DECAY_RULES = ("model", "mmdet_beit", "mmseg_itpn")


@dataclass
class ModelConfig:
    """The network. ``name`` is a timm model name registered by ``itpn_ds.models``; ``kwargs`` go to
    ``timm.create_model`` (e.g. ``img_size``, ``embed_dim``, ``depth``, ``teacher_dim``, ``num_classes``).

    grad_checkpointing: activation checkpointing of backbone and pyramid blocks: ``off``, ``every`` block,
                        or ``every_k`` (every ``checkpoint_every_k``-th block).
    attention:          ``sdpa`` (relative-position bias as SDPA's additive mask) or ``flex`` (FlexAttention, the
                        bias read inside the kernel; CUDA training, see docs/models.md). Parameters are the same.
    compile:            ``on``: regional ``torch.compile`` of each repeated block (``itpn_ds.models.compile``);
                        ``off``: eager.
    """

    name: str = "clip_tpn_base_3324_patch16_224"
    kwargs: dict[str, Any] = field(default_factory=dict)
    drop_path_rate: float = 0.1
    grad_checkpointing: str = "off"
    checkpoint_every_k: int = 2
    attention: str = "sdpa"
    compile: str = "off"

    def __post_init__(self) -> None:
        check_choice("model.grad_checkpointing", self.grad_checkpointing, CHECKPOINTING_POLICIES)
        check_choice("model.attention", self.attention, ATTENTION_BACKENDS)
        check_choice("model.compile", self.compile, COMPILE_MODES)
        if self.checkpoint_every_k < 1:
            raise ConfigError(f"model.checkpoint_every_k must be >= 1, got {self.checkpoint_every_k}")


@dataclass
class DataConfig:
    """Where the samples come from, how they are batched and augmented (``itpn_ds.data`` loaders).

    shards:       directory with the shard manifest (``itpn-ds make-shards`` output) for training.
    val_shards:   same for evaluation (fine-tuning / evaluate); empty: no evaluation.
    micro_batch:  samples per rank per forward/backward.
    num_threads:  DALI CPU threads per rank.
    loader:       ``dali`` or ``torch`` (the PyTorch fallback loader).
    device:       DALI decoding: ``auto`` (GPU ``mixed`` decoding when CUDA is present), ``cpu`` or ``gpu``.
    decode:       DALI JPEG decoding of a view: ``roi`` (only the view's box, ``decoders.image_slice``) or
                  ``full`` (the whole image, then the box cut out: the GPU's hardware JPEG decoder decodes
                  whole images only). The same pixels either way; the torch loader always decodes whole images.
    on_corrupt:   an undecodable sample met in training: ``skip`` (counted and logged with its key) or ``raise``.
    num_masked:   pre-training block masks: patches masked per image (None: 75 of 196, scaled to the grid).
    color_jitter: pre-training colour jitter of each view (torchvision's ColorJitter(s, s, s): brightness,
                  contrast, saturation) in [0, 1), 0: off. A teacher cache defines the views: its strength
                  (``extract-teacher --color-jitter``) must be this one.
    crop_scale:   pre-training RandomResizedCrop area range (published: 0.08-1 for CLIP, 0.2-1 for pixel); a
                  teacher cache's boxes were drawn with its own range, which must be this one.
    normalize:    the student's input statistics: ``imagenet`` (timm's default), ``inception`` (0.5/0.5, the
                  published iTPN CLIP scripts) or ``clip``; pre-training and fine-tuning of one model should agree.
    rand_augment_ops, rand_augment_magnitude: fine-tuning RandAugment n and m (m of 30; 0 ops: off).
    reprob:       fine-tuning random-erasing probability per image (0: off).
    crop_pct:     evaluation: resize the shorter side to size / crop_pct, then center-crop ``size``; None: as
                  published for the model's img_size, 224/256 below 384 px and 1.0 from 384 up.
    """

    shards: str = ""
    val_shards: str = ""
    micro_batch: int = 32
    num_threads: int = 2
    loader: str = "dali"
    device: str = "auto"
    decode: str = "roi"
    on_corrupt: str = "skip"
    num_masked: int | None = None
    color_jitter: float = 0.4
    crop_scale: tuple[float, float] = (0.08, 1.0)
    normalize: str = "imagenet"
    rand_augment_ops: int = 2
    rand_augment_magnitude: int = 9
    reprob: float = 0.25
    crop_pct: float | None = None

    def __post_init__(self) -> None:
        if self.micro_batch < 1:
            raise ConfigError(f"data.micro_batch must be >= 1, got {self.micro_batch}")
        check_choice("data.device", self.device, ("auto", "cpu", "gpu"))
        check_choice("data.decode", self.decode, ("roi", "full"))
        check_choice("data.on_corrupt", self.on_corrupt, ("skip", "raise"))
        check_choice("data.loader", self.loader, ("dali", "torch"))
        if not 0 <= self.color_jitter < 1:
            raise ConfigError(f"data.color_jitter must be in [0, 1) (0: off), got {self.color_jitter}")
        self.crop_scale = tuple(self.crop_scale)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}")
        check_choice("data.normalize", self.normalize, ("imagenet", "inception", "clip"))


@dataclass
class TeacherConfig:
    """CLIP targets for pre-training: from the Arrow cache (default) or computed online.

    cache:       teacher cache directory (``itpn-ds extract-teacher`` output), mode ``cache``.
    checkpoint:  CLIP checkpoint file, mode ``online``.
    arch:        open_clip architecture name (``ViT-L-14``) or a model-config JSON path.
    resolution:  teacher input size in pixels (196 for ViT-L/14 against a 224 student).
    """

    mode: str = "cache"
    cache: str = ""
    checkpoint: str = ""
    arch: str = "ViT-L-14"
    resolution: int = 196

    def __post_init__(self) -> None:
        check_choice("teacher.mode", self.mode, TEACHER_MODES)


@dataclass
class OptimConfig:
    """AdamW with per-step schedules of lr and weight decay after a linear lr warmup.

    ``schedule``: ``cosine`` (lr half-cosine to ``min_lr``), ``poly`` (mmseg's: ``(lr - min_lr) (1 - t) **
    poly_power + min_lr``, t the fraction of the run, multiplied by the warmup ramp during warmup) or ``step``
    (mmdet's: lr x ``lr_step_gamma`` at each of ``lr_step_epochs``, epochs from the start of the run, fractions
    allowed; ``min_lr`` unused).

    lr is the peak rate for the actual global batch (no implicit scaling). ``layer_decay`` < 1 scales the
    lr of layer i by ``layer_decay ** (num_layers - i)`` (fine-tuning); with ``layer_decay_depth`` N > 0 the
    decay is spread as iTPN's scripts do, ``layer_decay ** ((N + 1) (num_layers - i) / num_layers)``, so the
    embedding gets ``layer_decay ** (N + 1)`` at any depth (iTPN: N = 12, a ViT-B's depth; Fast-iTPN: 0).
    ``layer_decay_rule`` ``mmdet_beit`` / ``mmseg_itpn`` (dense task models) replaces the model's layers by the
    published dense constructors' with their ``num_layers`` = ``layer_decay_layers`` (``engine/optim.py``,
    docs/dense.md "Layer decay"); ``layer_decay_depth`` is then unused. ``clip_grad`` 0 disables clipping.
    ``optimizer`` ``auto`` picks torch's fused AdamW on CUDA (no compiler needed), DeepSpeedCPUAdam with
    optimizer offload, torch AdamW otherwise; ``fused_adam`` (DeepSpeed's, built with ``nvcc``) only when asked
    (``itpn_ds.engine.optim``).
    """

    optimizer: str = "auto"
    schedule: str = "cosine"
    poly_power: float = 1.0
    lr_step_epochs: list[float] = field(default_factory=list)
    lr_step_gamma: float = 0.1
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 10.0
    warmup_steps: int = -1
    weight_decay: float = 0.05
    weight_decay_end: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    layer_decay: float = 1.0
    layer_decay_depth: int = 0
    layer_decay_rule: str = "model"
    layer_decay_layers: int = 0
    clip_grad: float = 3.0

    def __post_init__(self) -> None:
        check_choice("optim.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("optim.schedule", self.schedule, LR_SCHEDULES)
        if not self.poly_power > 0:
            raise ConfigError(f"optim.poly_power must be > 0, got {self.poly_power}")
        if self.schedule == "step" and not (0 < self.lr_step_gamma <= 1 and all(e > 0 for e in self.lr_step_epochs)):
            raise ConfigError(f"optim.schedule=step needs optim.lr_step_gamma in (0, 1] and optim.lr_step_epochs > 0, "
                              f"got {self.lr_step_gamma} and {self.lr_step_epochs}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas must hold two numbers, got {self.betas}")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.min_lr < 0:
            raise ConfigError(f"optim.min_lr must be >= 0, got {self.min_lr}")
        if self.weight_decay < 0 or self.weight_decay_end < 0:
            raise ConfigError(f"optim.weight_decay and optim.weight_decay_end must be >= 0, got "
                              f"{self.weight_decay} and {self.weight_decay_end}")
        if not all(0 <= beta < 1 for beta in self.betas) or not self.eps > 0:
            raise ConfigError(f"optim.betas must be in [0, 1) and optim.eps > 0, got {self.betas} and {self.eps}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.layer_decay_depth < 0:
            raise ConfigError(f"optim.layer_decay_depth must be >= 0 (0 = the model's own layers), got "
                              f"{self.layer_decay_depth}")
        check_choice("optim.layer_decay_rule", self.layer_decay_rule, LAYER_DECAY_RULES)
        if (self.layer_decay_rule == "model") != (self.layer_decay_layers == 0) or self.layer_decay_layers < 0:
            raise ConfigError(f"optim.layer_decay_rule={self.layer_decay_rule} with optim.layer_decay_layers="
                              f"{self.layer_decay_layers}: the published rules need their num_layers (> 0, e.g. 30 "
                              "for iTPN-B, 44 for iTPN-L), the model's own rule none (0)")
        if self.clip_grad < 0:
            raise ConfigError(f"optim.clip_grad must be >= 0 (0 = off), got {self.clip_grad}")


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed JSON (``ds_configs/zero2.json`` or a path) and the run values that fill its "auto"s.

    precision:   ``bf16``, ``fp16`` (dynamic loss scaling) or ``fp32``; must agree with the JSON where the
                 JSON sets one explicitly.
    zero_stage:  -1 keeps the JSON's stage; 0-3 overrides it (a JSON with a different explicit stage is
                 an error only when it also says ``"stage"`` differently and this is set).
    """

    config: str = "zero2"
    precision: str = "bf16"
    zero_stage: int = -1

    def __post_init__(self) -> None:
        check_choice("deepspeed.precision", self.precision, PRECISIONS)
        if self.zero_stage not in (-1, 0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be -1 (from the JSON) or 0-3, got {self.zero_stage}")


@dataclass
class ScheduleConfig:
    """Length and batching of the run.

    epochs:       passes over the training set; ``max_steps`` > 0 stops earlier (optimizer steps).
    global_batch: samples per optimizer step over all ranks, the batch ``optim.lr`` belongs to. Kept on any
                  world size by gradient accumulation, ``global_batch / (data.micro_batch x world size)``
                  micro-batches per step (a world size that cannot keep it is refused);
                  0: ``data.micro_batch x grad_accum x world size``, whatever that gives.
    grad_accum:   micro-batches per rank per optimizer step; 0: from ``global_batch`` (1 without one). Stated
                  with a ``global_batch`` it must agree with it on the world size the run has.
    """

    epochs: int = 300
    max_steps: int = -1
    global_batch: int = 0
    grad_accum: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"schedule.epochs must be >= 1, got {self.epochs}")
        if self.global_batch < 0:
            raise ConfigError(f"schedule.global_batch must be >= 0 (0: micro_batch x grad_accum x ranks), "
                              f"got {self.global_batch}")
        if self.grad_accum < 0:
            raise ConfigError(f"schedule.grad_accum must be >= 0 (0: from schedule.global_batch), got {self.grad_accum}")


@dataclass
class CheckpointConfig:
    """Checkpoints under ``<run_dir>/checkpoints``: every ``every_steps`` optimizer steps (0: only at the
    end and on preemption), the last ``keep_last`` kept. ``resume``: ``auto`` continues from the latest
    checkpoint of the run directory when there is one, ``never`` refuses a run directory that has one."""

    every_steps: int = 1000
    keep_last: int = 3
    resume: str = "auto"

    def __post_init__(self) -> None:
        check_choice("checkpoint.resume", self.resume, RESUME_POLICIES)
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass
class NonFiniteConfig:
    """A step whose loss or gradient norm is not finite is skipped; after ``max_consecutive`` such steps in
    a row the run rolls back to the last good checkpoint and skips the batches that caused them."""

    max_consecutive: int = 3
    max_rollbacks: int = 5


@dataclass
class TelemetryConfig:
    """Per-step metrics. ``peak_tflops`` is one device's dense peak (bf16 on a GPU) for MFU; 0 looks it
    up from the device name (H100/H200/A100), and on the CPU MFU is not reported unless it is given."""

    log_every: int = 10
    peak_tflops: float = 0.0


@dataclass
class DebugConfig:
    """Fault injection for tests and drills (real code paths, never on in recipes).

    inject_nan_at_steps: optimizer steps (1-based, counted over the whole run) whose loss is made NaN.
    kill_at_step:        [rank, step]: that rank SIGKILLs itself before the given optimizer step.
    """

    inject_nan_at_steps: list[int] = field(default_factory=list)
    kill_at_step: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kill_at_step and len(self.kill_at_step) != 2:
            raise ConfigError(f"debug.kill_at_step must be [rank, step], got {self.kill_at_step}")


@dataclass
class RunConfig:
    """Everything one ``itpn-ds pretrain|finetune|segment|detect|evaluate`` run needs; ``task`` names the task
    (a registered one, ``itpn_ds.engine.tasks``) and each task reads its own section (the field of its name)."""

    task: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # k-NN probe of pre-training (engine/probe.py)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    nonfinite: NonFiniteConfig = field(default_factory=NonFiniteConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        check_choice("task", self.task, TASKS)


# ---------------------------------------------------------------------------------------------- loading

def recipe_path(recipe: str | Path) -> Path:
    """A recipe name (``itpn_base_clip_l_pretrain``) or a YAML path -> an existing file."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        return path
    packaged = RECIPES_DIR / f"{recipe}.yaml"
    if not packaged.is_file():
        names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise ConfigError(f"no recipe named {recipe!r}; packaged recipes: {', '.join(names)}")
    return packaged


class Yaml12BoolLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only ``true``/``false``, so ``off``, ``on``, ``yes`` and
    ``no`` stay strings (``model.grad_checkpointing=off`` is the policy name, not False)."""


Yaml12BoolLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Yaml12BoolLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                       list("tTfF"))


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults <- recipe YAML <- ``key=value`` overrides, validated into a :class:`RunConfig`."""
    data: dict[str, Any] = {}
    source = "defaults"
    if recipe:
        path = recipe_path(recipe)
        source = str(path)
        try:
            loaded = yaml.load(path.read_text(), Loader=Yaml12BoolLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded or {}
    data = apply_overrides(data, overrides)
    try:
        return from_dict(RunConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{source} (+ overrides {list(overrides)}): {exc}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "debug.inject_nan_at_steps=[3]"]`` set into a nested dict (values as YAML)."""
    out = _deepcopy_dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (dotted key, e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.load(raw, Loader=Yaml12BoolLoader) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; valid keys{' of ' + prefix if prefix else ''}: "
                          f"{', '.join(names)}")
    kwargs = {name: _coerce(hints[name], value, _join(prefix, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except FieldError as exc:  # the dataclass names its field, not the section it is configured under
        raise ConfigError(f"{_join(prefix, exc.field)} {exc.problem}") from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML-safe values (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved configuration as YAML (loadable again with ``load_config(path)``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
    return path


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        item_hints = args[:1] if origin is list or (len(args) == 2 and args[1] is Ellipsis) else args
        if origin is tuple and item_hints is args and len(args) != len(value):
            raise ConfigError(f"{key} must hold {len(args)} values, got {list(value)}")
        items = [_coerce(item_hints[min(i, len(item_hints) - 1)], v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    return value


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _deepcopy_dict(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy_dict(v) if isinstance(v, dict) else v for k, v in data.items()}
