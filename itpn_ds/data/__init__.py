"""Input side: shards on disk, the views sampled from them, and the DALI pipelines that decode them.

The engine builds loaders through ``build_pretrain_loader``, ``build_finetune_loader``,
``build_eval_loader``, ``build_segmentation_loader`` and ``build_detection_loader``. Keyword arguments:
rank, world_size, micro_batch, seed, num_threads, backend (``dali``, or ``torch`` = PIL decoding without
DALI) and each loader's own options (``device``, ``on_corrupt``, ``crop_pct``, ``num_masked``,
``patch_size``, ``rand_augment_ops``, ``reprob``, ``recipe``, ``scale``, ...).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from itpn_ds.data.batch import Batch, Loader


def build_pretrain_loader(shards: str | Path, views: Any, backend: str = "dali", **kwargs: Any) -> Loader:
    from itpn_ds.data.pretrain_pipeline import PretrainLoader

    return PretrainLoader(shards, views, backend=backend, **kwargs)


def build_finetune_loader(shards: str | Path, backend: str = "dali", **kwargs: Any) -> Loader:
    from itpn_ds.data.finetune_pipeline import FinetuneLoader

    return FinetuneLoader(shards, backend=backend, **kwargs)


def build_eval_loader(shards: str | Path, backend: str = "dali", **kwargs: Any) -> Loader:
    from itpn_ds.data.eval_pipeline import EvalLoader

    return EvalLoader(shards, backend=backend, **kwargs)


def build_segmentation_loader(shards: str | Path, train: bool = True, backend: str = "dali", **kwargs: Any) -> Loader:
    """SegTrainLoader (``recipe``: SegRecipe) or SegEvalLoader (``scale``) over segmentation shards."""
    from itpn_ds.data.seg_pipeline import SegEvalLoader, SegTrainLoader

    return (SegTrainLoader if train else SegEvalLoader)(shards, backend=backend, **kwargs)


def build_detection_loader(shards: str | Path, train: bool = True, **kwargs: Any) -> Loader:
    """DetTrainLoader (``recipe``: DetRecipe) or DetEvalLoader (``short_side``) over detection shards;
    they yield DetectionBatch (torch backend only)."""
    from itpn_ds.data.det_pipeline import DetEvalLoader, DetTrainLoader

    return (DetTrainLoader if train else DetEvalLoader)(shards, **kwargs)


__all__ = ["Batch", "Loader", "build_pretrain_loader", "build_finetune_loader", "build_eval_loader",
           "build_segmentation_loader", "build_detection_loader"]
