"""Input side: shards on disk, the views sampled from them, and the DALI pipelines that decode them.

The engine builds loaders through ``build_pretrain_loader``, ``build_finetune_loader`` and
``build_eval_loader``. Keyword arguments: rank, world_size, micro_batch, seed, num_threads, backend
(``dali``, or ``torch`` = PIL decoding without DALI) and each loader's own options (``device``,
``on_corrupt``, ``crop_pct``, ``num_masked``, ``patch_size``, ``rand_augment_ops``, ``reprob``, ...).
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


__all__ = ["Batch", "Loader", "build_pretrain_loader", "build_finetune_loader", "build_eval_loader"]
