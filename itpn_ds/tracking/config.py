"""How a run is tracked: the typed configuration of the MLflow tracker."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

START_POLICIES = ("require", "defer")
DEFAULT_EXPERIMENT = "itpn-ds"


def local_store_uri() -> str:
    """The default store without a URI: ``sqlite:///$XDG_DATA_HOME/itpn-ds/mlflow.db`` (``~/.local/share`` when
    XDG_DATA_HOME is unset), one per user and machine, outside every run directory."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"sqlite:///{Path(data_home).resolve() / 'itpn-ds' / 'mlflow.db'}"


@dataclass
class TrackingConfig:
    """Settings of experiment tracking (rank 0 only; every other rank gets a no-op tracker).

    enabled:           track at all (on by default; the first log line of a run says where it is tracked).
    uri:               MLflow tracking URI (``http://host:5000``, ``sqlite:///path.db``, ...). Empty: the
                       ``MLFLOW_TRACKING_URI`` environment variable (MLflow's own convention; a server's URI on a
                       cluster), else the single-machine default, a per-user sqlite store on this machine
                       (:func:`local_store_uri`), never inside the run directory.
    experiment:        experiment name, created on first use; empty: ``MLFLOW_EXPERIMENT_NAME``, else ``itpn-ds``.
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
    experiment: str = ""
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
        self.curve_metrics = tuple(self.curve_metrics)

    def resolved_uri(self) -> str:
        """The tracking URI this run uses (see ``uri``)."""
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI", "") or local_store_uri()

    def resolved_experiment(self) -> str:
        return self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME", "") or DEFAULT_EXPERIMENT

    def describe(self, run_dir: Path) -> str:
        """Where a run in ``run_dir`` is tracked, for its first log line."""
        if not self.enabled:
            return "tracking: off (tracking.enabled=false)"
        uri = self.resolved_uri()
        where = "" if uri != local_store_uri() else (
            " (the single-machine default: set MLFLOW_TRACKING_URI or tracking.uri to a tracking server for runs "
            "on several machines)")
        return (f"tracking: MLflow run {self.resolved_run_name(run_dir)!r} of experiment "
                f"{self.resolved_experiment()!r} at {uri}{where}; journal in {self.resolved_buffer_dir(run_dir)}")

    def resolved_buffer_dir(self, run_dir: Path) -> Path:
        return Path(self.buffer_dir) if self.buffer_dir else Path(run_dir) / "tracking"

    def resolved_run_name(self, run_dir: Path) -> str:
        return self.run_name or Path(run_dir).resolve().name
