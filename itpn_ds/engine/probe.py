"""A k-NN probe of a backbone's frozen features: how well its pooled features classify held-out images, while a
pre-training runs (every ``probe.every_steps`` and at the end) or afterwards (``itpn-ds probe``). docs/probe.md.

Every probe, all ranks together:

1. the pooled features (``itpn_ds.models.pooled``: ``backbone``, ``pyramid``) of ``probe.train_shards`` (the
   bank) and ``probe.val_shards`` (the queries), at most ``max_per_class`` images of each class of each set
   (the same images every time), center-cropped as evaluation reads them; each rank reads its share once
   (the evaluation loader's order, padding marked invalid), L2-normalised and kept in bf16;
2. the queries are gathered on every rank; the bank stays sharded: each rank finds every query's k nearest
   entries of its own share, in chunks of at most ``chunk_mib`` of fp32 similarities (``itpn_ds.engine.knn``);
3. the candidates are gathered and merged (the exact k nearest of the whole bank), and every rank scores the
   weighted vote of DINO (cosine, ``exp(cos / temperature)``) for each k of ``ks``: top-1 / top-5 (%).

Nothing in a probe draws a random number, so a resumed run's probes are those of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from itpn_ds.data.annotations import CLASSIFICATION
from itpn_ds.data.batch import Loader
from itpn_ds.data.class_map import ClassMap, align
from itpn_ds.data.eval_pipeline import per_class_subset
from itpn_ds.data.shards import Manifest
from itpn_ds.engine import knn
from itpn_ds.engine.loader_options import eval_crop_pct, loader_options
from itpn_ds.engine.losses import valid_mask
from itpn_ds.errors import ConfigError, import_for
from itpn_ds.models.pooled import BACKBONE, PYRAMID, pooled_dims, pooled_features
from itpn_ds.tracking.base import Tracker

if TYPE_CHECKING:  # config.py imports this module (ProbeConfig): no import of config at run time
    from itpn_ds.config import RunConfig

log = logging.getLogger("itpn_ds.engine")

FEATURE_DTYPE = torch.bfloat16
MIB = 2 ** 20


@dataclass
class ProbeConfig:
    """The k-NN probe of pre-training (``itpn_ds.engine.probe``); it runs when ``train_shards`` is set.

    train_shards:  classification shards (``itpn-ds make-shards``) whose features are the bank.
    val_shards:    classification shards classified against the bank; their classes must be ``train_shards``'
                   by name (``make-shards --classes-from TRAIN``).
    every_steps:   probe every this many optimizer steps, and at the end of the run (0: only at the end).
    max_per_class: at most this many images of each class of each set (0: all), the same ones every probe.
    ks:            numbers of neighbours, each probed (DINO: 10 and 20); every class of ``train_shards`` needs
                   at least the largest.
    temperature:   of the vote weights ``exp(cos / temperature)`` (DINO: 0.07).
    chunk_mib:     the most MiB one chunk of fp32 similarities (queries x one rank's bank share) takes.
    max_bank_mib:  the most MiB of features one rank may hold: its share of the bank plus all the queries
                   (bf16); a larger probe is refused before the run starts.
    """

    train_shards: str = ""
    val_shards: str = ""
    every_steps: int = 1000
    max_per_class: int = 50
    ks: tuple[int, ...] = (10, 20)
    temperature: float = 0.07
    chunk_mib: float = 64.0
    max_bank_mib: float = 1024.0

    def __post_init__(self) -> None:
        self.ks = tuple(sorted(set(self.ks)))
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"probe.ks must be numbers of neighbours >= 1, got {list(self.ks)}")
        if self.every_steps < 0 or self.max_per_class < 0:
            raise ValueError(f"probe.every_steps and probe.max_per_class must be >= 0 (0: at the end only / all "
                             f"images), got {self.every_steps} and {self.max_per_class}")
        if not (self.temperature > 0 and self.chunk_mib > 0 and self.max_bank_mib > 0):
            raise ValueError(f"probe.temperature, probe.chunk_mib and probe.max_bank_mib must be > 0, got "
                             f"{self.temperature}, {self.chunk_mib} and {self.max_bank_mib}")

    @property
    def enabled(self) -> bool:
        return bool(self.train_shards)


def metric_name(feature: str, k: int, top: int) -> str:
    """``probe/backbone_k20_top1``: the tracked name of one probe number."""
    return f"probe/{feature}_k{k}_top{top}"


def curve_metrics(cfg: ProbeConfig) -> tuple[str, ...]:
    """The probe's numbers a tracker draws beside the loss: top-1 of each pooled feature at the largest k (none
    when the probe is off)."""
    if not cfg.enabled:
        return ()
    return tuple(metric_name(feature, max(cfg.ks), 1) for feature in (BACKBONE, PYRAMID))


class KnnProbe:
    """One probe configuration over its two loaders (:func:`build_probe` builds it).

    bank_loader, query_loader: evaluation loaders over this rank's share of ``train_shards`` / ``val_shards``;
    query_table: (n,) int64, a query label -> the bank's id of its class; num_classes: ids of the bank's map.
    """

    def __init__(self, cfg: ProbeConfig, bank_loader: Loader, query_loader: Loader, query_table: torch.Tensor,
                 num_classes: int, device: torch.device, rank: int = 0) -> None:
        self.cfg = cfg
        self.bank_loader, self.query_loader = bank_loader, query_loader
        self.query_table = query_table.to(device)
        self.num_classes = num_classes
        self.device = device
        self.rank = rank
        self.started = time.perf_counter()
        self.spent_s = 0.0

    def due(self, step: int) -> bool:
        """Whether step ``step`` (optimizer steps done) is one of the periodic probes."""
        return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict[str, float]:
        """Top-1 / top-5 (%) of each pooled feature and each k (``metric_name``); all ranks, the same numbers."""
        was_training = model.training
        model.eval()
        try:
            with gathered_root_parameters(model):
                bank, bank_labels, bank_valid = self._features(model, self.bank_loader)
                queries, query_labels, query_valid = self._features(model, self.query_loader)
        finally:
            model.train(was_training)
        query_valid = _all_gather(query_valid.to(torch.uint8)).bool()  # gloo gathers no bool tensors
        targets = self.query_table[_all_gather(query_labels)[query_valid]]
        metrics: dict[str, float] = {}
        for feature in bank:
            shard, shard_labels = bank[feature][bank_valid], bank_labels[bank_valid]
            all_queries = _all_gather(queries[feature])[query_valid]
            chunk = knn.chunk_rows(len(shard), int(self.cfg.chunk_mib * MIB))
            sims, labels = knn.shard_topk(all_queries, shard, shard_labels, max(self.cfg.ks), chunk)
            sims, labels = knn.merge_topk(torch.cat(_all_gather_list(sims), 1), torch.cat(_all_gather_list(labels), 1),
                                          max(self.cfg.ks))
            for k, hits in knn.knn_hits(sims, labels, targets, self.num_classes, self.cfg.ks,
                                        self.cfg.temperature).items():
                for top, count in hits.items():
                    metrics[metric_name(feature, k, top)] = 100.0 * count / max(len(targets), 1)
        return metrics

    def run(self, model: nn.Module, step: int, best: dict[str, float], tracker: Tracker, final: bool = False
            ) -> dict[str, float]:
        """Probe ``model`` after ``step``: its numbers, seconds and share of the run's time so far logged and
        tracked; ``best`` (top-1 name -> best value so far) updated in place. Returns the probe's metrics."""
        start = time.perf_counter()
        metrics = self.measure(model)
        seconds = time.perf_counter() - start
        self.spent_s += seconds
        share = self.spent_s / max(time.perf_counter() - self.started, 1e-9)
        for name, value in metrics.items():
            if name.endswith("_top1") and value > best.get(name, -1.0):
                best[name] = value
        metrics.update({"probe/seconds": seconds, "probe/run_share": share,
                        **{name.replace("probe/", "probe/best_"): value for name, value in best.items()}})
        if self.rank == 0:
            log.info("probe at step %d: %s (%.1f s, %.1f%% of this attempt's time so far)", step,
                     format_probe(metrics), seconds, 100 * share)
            if final:
                log.info("probe best: %s", ", ".join(f"{name[len('probe/'):]} {value:.2f}"
                                                     for name, value in sorted(best.items())))
        tracker.log_metrics(metrics, step=step)
        return metrics

    def _features(self, model: nn.Module, loader: Loader
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """This rank's share of ``loader``: name -> (n, width) normalised bf16 features, labels (n,), valid (n,)
        (padding rows included, so every rank holds the same n)."""
        dtype = next(model.parameters()).dtype
        autocast = self.device.type == "cuda" and dtype == torch.float32
        features: dict[str, list[torch.Tensor]] = {}
        labels, valid = [], []
        for batch in loader:
            batch = batch.to(self.device)
            with torch.autocast(self.device.type, dtype=FEATURE_DTYPE, enabled=autocast):
                pooled = pooled_features(model, batch.images.to(dtype))
            for name, value in pooled.items():
                features.setdefault(name, []).append(knn.normalize(value).to(FEATURE_DTYPE))
            labels.append(batch.labels)
            valid.append(valid_mask(batch.valid, len(batch), self.device).bool())
        return {name: torch.cat(parts) for name, parts in features.items()}, torch.cat(labels), torch.cat(valid)


def format_probe(metrics: dict[str, float]) -> str:
    """``backbone k10 70.00/95.00 k20 ...; pyramid ...``: top-1 / top-5 (%) of each feature and k."""
    by_feature: dict[str, list[str]] = {}
    for name, value in metrics.items():
        if name.endswith("_top1") and not name.startswith("probe/best_"):
            feature, k = name[len("probe/"):-len("_top1")].rsplit("_k", 1)
            by_feature.setdefault(feature, []).append(
                f"k{k} top-1 {value:.2f} top-5 {metrics[name[:-1] + '5']:.2f}")
    return "; ".join(f"{feature} {', '.join(parts)}" for feature, parts in by_feature.items())


def held_bytes(bank_rows: int, query_rows: int, model: nn.Module, micro_batch: int, world_size: int) -> int:
    """Bytes of features one rank holds in a probe: its share of ``bank_rows`` bank images and all ``query_rows``
    queries, each padded to whole steps of ``micro_batch`` per rank as the loaders read them, every pooled
    feature of ``model``, bf16."""
    width = sum(pooled_dims(model).values())
    itemsize = torch.empty((), dtype=FEATURE_DTYPE).element_size()
    steps = lambda rows: math.ceil(rows / (micro_batch * world_size))  # noqa: E731
    return (steps(bank_rows) + steps(query_rows) * world_size) * micro_batch * width * itemsize


@contextlib.contextmanager
def gathered_root_parameters(model: nn.Module) -> Iterator[None]:
    """Under ZeRO-3 the parameters a model owns itself (position embedding, mask token) are gathered only by its
    own forward hook; the probe calls the model's parts, so they are gathered here for the probe's duration."""
    own = [p for p in model.parameters(recurse=False) if hasattr(p, "ds_id")]
    if not own:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(own):
        yield


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (the same shape on all) concatenated along dim 0, in rank order."""
    return torch.cat(_all_gather_list(tensor))


def _all_gather_list(tensor: torch.Tensor) -> list[torch.Tensor]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


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
    _check_probe_counts(p, manifests["train_shards"], subsets["train_shards"], bank_map)
    try:
        held = held_bytes(len(subsets["train_shards"]), len(subsets["val_shards"]), model, cfg.data.micro_batch,
                          world_size)
    except ValueError as exc:
        raise ConfigError(f"probe.train_shards is set but model.name={cfg.model.name!r}: {exc}") from None
    if held > p.max_bank_mib * MIB:
        raise ConfigError(f"probe: {len(subsets['train_shards'])} bank and {len(subsets['val_shards'])} query images "
                          f"on {world_size} rank(s) hold {held / MIB:.0f} MiB of features per rank, more than "
                          f"probe.max_bank_mib={p.max_bank_mib:g}: lower probe.max_per_class or raise the bound")
    data = import_for("itpn_ds.data", "probe")
    options = loader_options(cfg, rank, world_size)
    crop_pct = eval_crop_pct(cfg.data.crop_pct, options["img_size"])
    bank_loader, query_loader = (data.build_eval_loader(getattr(p, key), crop_pct=crop_pct, samples=subsets[key],
                                                        **options) for key in ("train_shards", "val_shards"))
    table = alignment.label_table(max(alignment.index, default=0) + 1)
    return KnnProbe(p, bank_loader, query_loader, table, max(bank_map.ids.values()) + 1, device, rank)


def _check_probe_counts(p: ProbeConfig, manifest: Manifest, subset: Any, bank_map: ClassMap) -> None:
    """Every class of the probe's bank has at least the largest k of ``probe.ks`` images."""
    k = max(p.ks)
    counts = {label: 0 for label in bank_map.ids.values()}
    for index in subset:
        counts[manifest.labels[index]] += 1
    for name, label in bank_map.ids.items():
        if counts[label] < k:
            cap = f" (probe.max_per_class={p.max_per_class})" if p.max_per_class else ""
            raise ConfigError(f"probe.train_shards={p.train_shards}: class {name!r} has {counts[label]} image(s){cap}, "
                              f"fewer than k={k} (probe.ks={list(p.ks)}): give every class at least {k} images or "
                              "lower probe.ks")
