"""What every image-level loader of ``itpn_ds.data`` takes from the run's ``data.*`` section (pre-training,
classification, the k-NN probe): batching, decoding, the student's input size and statistics, the evaluation
crop."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from itpn_ds.errors import ConfigError

if TYPE_CHECKING:  # config.py imports the task modules, which import this one: no import of config at run time
    from itpn_ds.config import RunConfig


def loader_options(cfg: RunConfig, rank: int, world_size: int) -> dict[str, Any]:
    """The keywords every image-level loader of ``itpn_ds.data`` takes, from ``data.*``."""
    d = cfg.data
    return dict(rank=rank, world_size=world_size, micro_batch=d.micro_batch, seed=cfg.schedule.seed,
                num_threads=d.num_threads, backend=d.loader, device=d.device, decode=d.decode, on_corrupt=d.on_corrupt,
                img_size=cfg.model.kwargs.get("img_size", 224), normalize=d.normalize)


def require_train_shards(cfg: RunConfig) -> None:
    if not cfg.data.shards:
        raise ConfigError("data.shards is empty: give the shard directory (itpn-ds make-shards output)")


def eval_crop_pct(crop_pct: float | None, img_size: int) -> float:
    """``data.crop_pct``, or when it is None the published default for ``img_size`` (px): 224/256 below 384,
    1.0 from 384 up (a 384 px model is evaluated on the whole resized center square)."""
    if crop_pct is not None:
        return crop_pct
    return 224 / 256 if img_size < 384 else 1.0
