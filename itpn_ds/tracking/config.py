"""How a run is tracked: the typed configuration of the MLflow tracker."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

START_POLICIES = ("require", "defer")


@dataclass
class TrackingConfig:
    """Settings of experiment tracking (rank 0 only; every other rank gets a no-op tracker).

    enabled:           track at all.
    uri:               MLflow tracking URI (``http://host:5000``, ``sqlite:///path.db``, ...). Empty: the
                       ``MLFLOW_TRACKING_URI`` environment variable, else ``sqlite:///<run_dir>/mlflow.db``.
    experiment:        experiment name; created on first use.
    run_name:          MLflow run name; empty: the run directory's name.
    buffer_dir:        where the on-disk journal, its cursor and the run id live; empty: ``<run_dir>/tracking``.
    artifact_location: artifact root for an experiment this tracker creates; empty: the server's default
                       (for a sqlite URI, ``<directory of the db>/mlartifacts``).
    on_unreachable:    at start-up, ``require`` fails with a clear error when the tracking store cannot be
                       reached within ``start_timeout_s``; ``defer`` trains on and creates the run when the
                       store comes back (everything is buffered on disk meanwhile).
    start_timeout_s:   how long start-up waits for the run to be created or reattached.
    request_timeout_s: timeout of one HTTP request to the server (no retries inside MLflow's client: the
                       background sender retries, so the training loop never waits on the network).
    retry_interval_s:  first pause of the sender after a failed send; doubles up to ``max_retry_interval_s``.
    close_timeout_s:   how long ``close()`` waits for the buffer to drain; what is left stays on disk.
    curve_metrics:     metric names drawn, one panel each, into ``curves.png`` at close.
    """

    enabled: bool = True
    uri: str = ""
    experiment: str = "itpn-ds"
    run_name: str = ""
    buffer_dir: str = ""
    artifact_location: str = ""
    on_unreachable: str = "require"
    start_timeout_s: float = 30.0
    request_timeout_s: float = 5.0
    retry_interval_s: float = 1.0
    max_retry_interval_s: float = 30.0
    close_timeout_s: float = 60.0
    curve_metrics: tuple[str, ...] = ("train/loss", "train/lr", "train/images_per_s")

    def __post_init__(self) -> None:
        if self.on_unreachable not in START_POLICIES:
            raise ValueError(f"tracking.on_unreachable must be one of {START_POLICIES}, "
                             f"got {self.on_unreachable!r}")
        for name in ("start_timeout_s", "request_timeout_s", "retry_interval_s", "max_retry_interval_s",
                     "close_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"tracking.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.experiment:
            raise ValueError("tracking.experiment must not be empty")
        self.curve_metrics = tuple(self.curve_metrics)

    def resolved_uri(self, run_dir: Path) -> str:
        """The tracking URI this run uses (see ``uri``)."""
        if self.uri:
            return self.uri
        from_env = os.environ.get("MLFLOW_TRACKING_URI", "")
        if from_env:
            return from_env
        return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"

    def resolved_buffer_dir(self, run_dir: Path) -> Path:
        return Path(self.buffer_dir) if self.buffer_dir else Path(run_dir) / "tracking"

    def resolved_run_name(self, run_dir: Path) -> str:
        return self.run_name or Path(run_dir).resolve().name
