"""The engine's seams to the other components: model, loaders, teacher, FLOPs, tracker.

Each builder takes the run configuration and returns the real component from its package
(``itpn_ds.models``, ``itpn_ds.data``, ``itpn_ds.teacher``, ``itpn_ds.tracking``). Nothing here trains.
"""
from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from itpn_ds.config import ConfigError, RunConfig
from itpn_ds.data.annotations import CLASSIFICATION
from itpn_ds.data.batch import Loader
from itpn_ds.data.class_map import ClassMap, align
from itpn_ds.data.eval_pipeline import per_class_subset
from itpn_ds.data.shards import Manifest
from itpn_ds.engine.probe import MIB, KnnProbe, held_bytes, metric_name
from itpn_ds.models.pooled import BACKBONE, PYRAMID
from itpn_ds.tracking import build_tracker
from itpn_ds.tracking.base import Tracker


def _import(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{what} needs {module}, which cannot be imported: {exc}") from exc


def build_model(cfg: RunConfig) -> nn.Module:
    """``itpn_ds.models.create_model(model.name, drop_path_rate, **model.kwargs)`` (our pre-training and task
    names, timm's classifiers), the checkpointing policy, the attention backend, then (with
    ``model.compile=on``) regional compilation of the repeated blocks (``itpn_ds.models.compile``: compiled
    blocks run inside the policy's checkpoints)."""
    _import("itpn_ds.models", "model.name")  # registers the timm names
    from itpn_ds.models.layers import set_attention_backend
    from itpn_ds.models.registry import create_model

    _check_model_kwargs(cfg)
    try:
        model = create_model(cfg.model.name, drop_path_rate=cfg.model.drop_path_rate, **cfg.model.kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:  # ValueError: an option out of its choices (a head, a pool)
        raise ConfigError(f"model.name={cfg.model.name!r} with model.kwargs={cfg.model.kwargs}: {exc}") from exc
    policy = cfg.model.grad_checkpointing
    if policy != "off":
        every_k = 1 if policy == "every" else cfg.model.checkpoint_every_k
        model.set_grad_checkpointing(True, every_k=every_k)
    try:
        set_attention_backend(model, cfg.model.attention)
    except ValueError as exc:
        raise ConfigError(f"model.attention={cfg.model.attention}: {exc}") from exc
    if cfg.model.compile == "on":
        from itpn_ds.models.compile import compile_repeated_blocks

        try:
            compile_repeated_blocks(model)
        except ValueError as exc:
            raise ConfigError(f"model.compile=on with model.name={cfg.model.name!r}: {exc}; use model.compile=off") from exc
    return model


def check_trainable_here(cfg: RunConfig, device: torch.device) -> None:
    """Refuse, before any work, a training configuration this device cannot run."""
    if cfg.model.attention == "flex" and device.type == "cpu":
        raise ConfigError(f"model.attention=flex: FlexAttention has no backward on the CPU (torch {torch.__version__}); "
                          "train on the CPU with model.attention=sdpa (flex is for CUDA, or CPU evaluation)")


def _check_model_kwargs(cfg: RunConfig) -> None:
    """Every ``model.kwargs`` key must be a constructor keyword of the model's class (checked before any
    work, so a typo is one line naming the key rather than a TypeError from deep in the build)."""
    from itpn_ds.models.registry import MODEL_CONFIGS, constructor_keywords

    if cfg.model.name not in MODEL_CONFIGS:
        return  # another timm model: timm checks its own keywords
    cls = MODEL_CONFIGS[cfg.model.name][0]
    known = constructor_keywords(cls)
    unknown = sorted(set(cfg.model.kwargs) - known)
    if unknown:
        raise ConfigError(f"model.kwargs.{unknown[0]}: not a keyword of {cls.__name__} ({cfg.model.name}); "
                          f"known keywords: {', '.join(sorted(known))}")


def check_objective(cfg: RunConfig, model: nn.Module) -> None:
    """The pre-training objective needs its model family: CLIP distillation heads or a pixel decoder."""
    from itpn_ds.models.clip_distill import ClipDistillHeads
    from itpn_ds.models.pixel_mae import ITPNPixelMAE

    needed = {"clip": (ClipDistillHeads, "a CLIP-distillation model (clip_tpn_*, fast_clip_tpn_*)"),
              "pixel": (ITPNPixelMAE, "an ITPNPixelMAE model (itpn_*_dec512d8b)")}
    cls, family = needed[cfg.pretrain.objective]
    if not isinstance(model, cls):
        raise ConfigError(f"pretrain.objective={cfg.pretrain.objective} needs {family}; "
                          f"model.name={cfg.model.name!r} builds {type(model).__name__}")


def forward_flops_per_image(model: nn.Module, image_size: int | tuple[int, int] | None = None) -> float:
    """Forward FLOPs of one image (of ``image_size``, (H, W); None: the model's own) from the architecture
    (``itpn_ds.models.flops``); 0 when unknown."""
    try:
        flops = importlib.import_module("itpn_ds.models.flops")
    except ImportError:
        return 0.0
    return float(flops.forward_flops(model, image_size))


def _loader_options(cfg: RunConfig, rank: int, world_size: int) -> dict[str, Any]:
    """The keywords every image-level loader of ``itpn_ds.data`` takes, from ``data.*``."""
    d = cfg.data
    return dict(rank=rank, world_size=world_size, micro_batch=d.micro_batch, seed=cfg.schedule.seed,
                num_threads=d.num_threads, backend=d.loader, device=d.device, decode=d.decode, on_corrupt=d.on_corrupt,
                img_size=cfg.model.kwargs.get("img_size", 224), normalize=d.normalize)


def _require_train_shards(cfg: RunConfig) -> None:
    if not cfg.data.shards:
        raise ConfigError("data.shards is empty: give the shard directory (itpn-ds make-shards output)")


def build_pretrain_loader(cfg: RunConfig, rank: int, world_size: int) -> Loader:
    """The pre-training loader over ``data.shards``: views from the teacher cache or drawn here, masks, and the
    teacher's view with the online teacher (``itpn_ds.data.build_pretrain_loader``)."""
    data = _import("itpn_ds.data", "data")
    _require_train_shards(cfg)
    pixel = cfg.pretrain.objective == "pixel"
    online = cfg.teacher.mode == "online" and not pixel
    return data.build_pretrain_loader(cfg.data.shards, views=_view_source(cfg), num_masked=cfg.data.num_masked,
                                      patch_size=cfg.model.kwargs.get("patch_size", 16),
                                      teacher_resolution=cfg.teacher.resolution if online else 0,
                                      mask_ratio=cfg.pretrain.mask_ratio if pixel else None,
                                      **_loader_options(cfg, rank, world_size))


def build_classification_loaders(cfg: RunConfig, rank: int, world_size: int, train: bool = True
                                 ) -> tuple[Loader | None, Loader | None]:
    """(RandAugment / random-erasing train loader over ``data.shards``, center-crop eval loader over
    ``data.val_shards``); either None when not asked or not configured."""
    data = _import("itpn_ds.data", "data")
    d, common = cfg.data, _loader_options(cfg, rank, world_size)
    train_loader = eval_loader = None
    if train:
        _require_train_shards(cfg)
        train_loader = data.build_finetune_loader(d.shards, rand_augment_ops=d.rand_augment_ops,
                                                  rand_augment_magnitude=d.rand_augment_magnitude, reprob=d.reprob,
                                                  **common)
    if d.val_shards:
        eval_loader = data.build_eval_loader(d.val_shards, crop_pct=eval_crop_pct(d.crop_pct, common["img_size"]),
                                             **common)
    return train_loader, eval_loader


def build_probe(cfg: RunConfig, rank: int, world_size: int, device: torch.device, model: nn.Module) -> KnnProbe | None:
    """The k-NN probe of ``probe.*`` over evaluation loaders of its two shard sets (None: ``probe.train_shards``
    is empty). Refused, before any work, naming the key: no ``probe.val_shards``, shards that are not
    classification shards, a validation class the bank lacks (by name), a bank class with fewer images than the
    largest k, a model without pooled features, features beyond ``probe.max_bank_mib`` on one rank."""
    p = cfg.probe
    if not p.enabled:
        return None
    if not p.val_shards:
        raise ConfigError(f"probe.train_shards={p.train_shards} is set but probe.val_shards is empty: give the "
                          "held-out classification shards the probe classifies (make-shards --classes-from "
                          "TRAIN_SHARDS), or unset probe.train_shards")
    manifests = {key: Manifest.load(getattr(p, key)) for key in ("train_shards", "val_shards")}
    for key, manifest in manifests.items():
        if manifest.kind != CLASSIFICATION:
            raise ConfigError(f"probe.{key}={getattr(p, key)} holds {manifest.kind} shards; the probe needs "
                              "labelled classification shards (itpn-ds make-shards IMAGES OUT)")
    bank_map = ClassMap.of_manifest(manifests["train_shards"])
    alignment = align(bank_map, ClassMap.of_manifest(manifests["val_shards"]), f"probe.val_shards={p.val_shards}",
                      f"probe.train_shards={p.train_shards}")
    subsets = {key: per_class_subset(m.keys, m.labels, p.max_per_class, cfg.schedule.seed)
               for key, m in manifests.items()}
    _check_probe_counts(cfg, manifests["train_shards"], subsets["train_shards"], bank_map)
    try:
        held = held_bytes(len(subsets["train_shards"]), len(subsets["val_shards"]), model, cfg.data.micro_batch,
                          world_size)
    except ValueError as exc:
        raise ConfigError(f"probe.train_shards is set but model.name={cfg.model.name!r}: {exc}") from None
    if held > p.max_bank_mib * MIB:
        raise ConfigError(f"probe: {len(subsets['train_shards'])} bank and {len(subsets['val_shards'])} query images "
                          f"on {world_size} rank(s) hold {held / MIB:.0f} MiB of features per rank, more than "
                          f"probe.max_bank_mib={p.max_bank_mib:g}: lower probe.max_per_class or raise the bound")
    data = _import("itpn_ds.data", "probe")
    options = _loader_options(cfg, rank, world_size)
    crop_pct = eval_crop_pct(cfg.data.crop_pct, options["img_size"])
    bank_loader, query_loader = (data.build_eval_loader(getattr(p, key), crop_pct=crop_pct, samples=subsets[key],
                                                        **options) for key in ("train_shards", "val_shards"))
    table = alignment.label_table(max(alignment.index, default=0) + 1)
    return KnnProbe(p, bank_loader, query_loader, table, max(bank_map.ids.values()) + 1, device, rank)


def _check_probe_counts(cfg: RunConfig, manifest: Manifest, subset: Any, bank_map: ClassMap) -> None:
    """Every class of the probe's bank has at least the largest k of ``probe.ks`` images."""
    p, k = cfg.probe, max(cfg.probe.ks)
    counts = {label: 0 for label in bank_map.ids.values()}
    for index in subset:
        counts[manifest.labels[index]] += 1
    for name, label in bank_map.ids.items():
        if counts[label] < k:
            cap = f" (probe.max_per_class={p.max_per_class})" if p.max_per_class else ""
            raise ConfigError(f"probe.train_shards={p.train_shards}: class {name!r} has {counts[label]} image(s){cap}, "
                              f"fewer than k={k} (probe.ks={list(p.ks)}): give every class at least {k} images or "
                              "lower probe.ks")


def check_label_range(cfg: RunConfig, manifests: dict[str, Any]) -> None:
    """Fine-tuning: every label of the shards ``manifests`` (``data.<key>`` -> ``Manifest``) must be below
    ``finetune.num_classes``."""
    for key, manifest in manifests.items():
        needed = max(manifest.num_classes, max(manifest.labels, default=-1) + 1)
        if needed > cfg.finetune.num_classes:
            raise ConfigError(f"data.{key}={getattr(cfg.data, key)} has {needed} classes (labels 0..{needed - 1}) but "
                              f"finetune.num_classes={cfg.finetune.num_classes}: set finetune.num_classes={needed}")


def eval_crop_pct(crop_pct: float | None, img_size: int) -> float:
    """``data.crop_pct``, or when it is None the published default for ``img_size`` (px): 224/256 below 384,
    1.0 from 384 up (a 384 px model is evaluated on the whole resized center square)."""
    if crop_pct is not None:
        return crop_pct
    return 224 / 256 if img_size < 384 else 1.0


def _view_source(cfg: RunConfig) -> Any:
    if cfg.teacher.mode == "cache" and cfg.pretrain.objective == "clip":
        if not cfg.teacher.cache:
            raise ConfigError("teacher.mode=cache needs teacher.cache (itpn-ds extract-teacher output)")
        teacher = _import("itpn_ds.teacher", "teacher.cache")
        cache = teacher.TeacherCache(Path(cfg.teacher.cache), shards=Path(cfg.data.shards),
                                     expected_teacher=expected_cache_teacher(cfg), color_jitter=cfg.data.color_jitter)
        if tuple(cache.meta.scale) != tuple(cfg.data.crop_scale):
            raise ConfigError(f"teacher.cache {cfg.teacher.cache} holds boxes drawn with crop scale {cache.meta.scale} "
                              f"but data.crop_scale is {cfg.data.crop_scale}: make them agree (the cache defines the views)")
        return cache
    from itpn_ds.data.views import SampledViews

    return SampledViews(seed=cfg.schedule.seed, scale=cfg.data.crop_scale, color_jitter=cfg.data.color_jitter)


def expected_cache_teacher(cfg: RunConfig) -> dict[str, Any]:
    """What the run requires of a cache's teacher: its resolution, and the checkpoint's sha256 when the run
    names ``teacher.checkpoint`` (so a cache made with other weights is refused)."""
    expected: dict[str, Any] = {"resolution": cfg.teacher.resolution}
    if cfg.teacher.checkpoint:
        from itpn_ds.teacher.clip import file_sha256

        expected["checkpoint_sha256"] = file_sha256(cfg.teacher.checkpoint)
    return expected


def build_online_teacher(cfg: RunConfig, device: torch.device) -> Any:
    """The frozen CLIP teacher (teacher.mode=online): images in [0, 1] -> targets (B, T, D)."""
    if not cfg.teacher.checkpoint:
        raise ConfigError("teacher.mode=online needs teacher.checkpoint (a CLIP checkpoint file)")
    teacher = _import("itpn_ds.teacher", "teacher.mode=online")
    return teacher.load_teacher(cfg.teacher.arch, cfg.teacher.checkpoint, device=device,
                                resolution=cfg.teacher.resolution)


def build_mixup(cfg: RunConfig) -> Any:
    """timm's Mixup for fine-tuning, or None when mixup and cutmix are both off."""
    ft = cfg.finetune
    if ft.mixup <= 0 and ft.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, label_smoothing=ft.label_smoothing,
                 num_classes=ft.num_classes)


def tracker_for(cfg: RunConfig, rank: int, run_dir: Path, dist_env: Any) -> Tracker:
    """The run's tracker (``itpn_ds.tracking``); with the probe on, its top-1 curves are drawn beside the loss."""
    tracking = cfg.tracking
    if cfg.probe.enabled:
        k = max(cfg.probe.ks)
        tracking = replace(tracking, curve_metrics=(*tracking.curve_metrics, *(metric_name(feature, k, 1)
                                                                                for feature in (BACKBONE, PYRAMID))))
    return build_tracker(tracking, rank, run_dir, dist_env)
