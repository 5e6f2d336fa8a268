"""``build_tracker``: the one place that decides which tracker a process gets."""
from __future__ import annotations

from pathlib import Path

from itpn_ds.distributed import DistEnv
from itpn_ds.tracking.base import NoOpTracker, Tracker
from itpn_ds.tracking.config import TrackingConfig
from itpn_ds.tracking.context import run_tags


def build_tracker(cfg: TrackingConfig, rank: int, run_dir: Path, dist: DistEnv | None = None) -> Tracker:
    """MLflow on rank 0 when tracking is enabled; a ``NoOpTracker`` otherwise (other ranks never talk to MLflow).

    The MLflow tracker starts by tagging the run with where this attempt runs (git sha, world size, node
    list, SLURM job id and restart count). ``dist`` defaults to a single process.
    """
    if not cfg.enabled or rank != 0:
        return NoOpTracker()
    from itpn_ds.tracking.mlflow_tracker import MLflowTracker

    tracker = MLflowTracker(cfg, Path(run_dir))
    tracker.set_tags(run_tags(dist or DistEnv(0, 0, 1, "127.0.0.1", 0, "single")))
    return tracker
