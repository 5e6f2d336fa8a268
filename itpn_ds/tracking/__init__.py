"""Experiment tracking: MLflow on rank 0, a no-op tracker everywhere else.

``build_tracker(cfg, rank, run_dir, dist)`` is the entry point; see docs/tracking.md.
"""
from itpn_ds.tracking.base import NoOpTracker, Tracker
from itpn_ds.tracking.config import TrackingConfig
from itpn_ds.tracking.factory import build_tracker

__all__ = ["NoOpTracker", "Tracker", "TrackingConfig", "build_tracker"]
