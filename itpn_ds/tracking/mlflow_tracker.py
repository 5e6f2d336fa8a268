"""``MLflowTracker``: rank 0's tracker. Calls write to the on-disk journal; a background thread sends.

The training loop only ever appends a line to a local file. A daemon thread creates or reattaches the
MLflow run and drains the journal, retrying with a capped exponential pause while the store is down, so
an outage costs nothing but delay. ``close()`` draws the curves, records the run's final status and waits
(bounded) for the journal to drain; whatever is still unsent stays on disk for the next attempt.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Mapping

from itpn_ds.errors import UserError
from itpn_ds.tracking.config import TrackingConfig
from itpn_ds.tracking.context import flatten_params
from itpn_ds.tracking.curves import draw_curves, metric_history
from itpn_ds.tracking.journal import Journal, now_ms
from itpn_ds.tracking.sender import MLflowSender, RecordRejected, StoreUnavailable

log = logging.getLogger(__name__)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
POLL_INTERVAL_S = 1.0


class TrackingUnavailable(UserError, RuntimeError):
    """Start-up policy ``require``: the tracking store could not be reached in time."""


class MLflowTracker:
    """The ``Tracker`` protocol on MLflow, buffered on disk (see the module docstring)."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.uri = cfg.resolved_uri()
        self.journal = Journal(cfg.resolved_buffer_dir(run_dir))
        self._sender = MLflowSender(self.uri, self.journal, cfg.resolved_experiment(), cfg.resolved_run_name(run_dir),
                                    cfg.artifact_location, cfg.request_timeout_s)
        self._sender.check_run_record()
        self._attached = threading.Event()
        self._closing = threading.Event()
        self._abandon = threading.Event()
        self._wake = threading.Event()
        self._fatal: Exception | None = None
        self._closed = False
        self.journal.append({"kind": "start", "time": now_ms(), "status": "RUNNING"})
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()
        if cfg.on_unreachable == "require":
            self._wait_until_attached()

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (None until the run is created; see ``on_unreachable``)."""
        return self._sender.run_id

    # -- the Tracker protocol -----------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested mappings are flattened to dotted names (``{"deepspeed": ds_config}`` -> ``deepspeed.*``)."""
        self.journal.append({"kind": "params", "values": flatten_params(params)})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = {name: float(value) for name, value in metrics.items()}
        self.journal.append({"kind": "metrics", "step": int(step), "time": now_ms(), "values": values})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.journal.append({"kind": "tags", "values": {key: str(value) for key, value in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (in the background: it must stay in place until sent)."""
        path = Path(path).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"artifact {path} does not exist or is not a file")
        self.journal.append({"kind": "artifact", "path": str(path), "artifact_path": artifact_path})

    def close(self, status: str = "FINISHED") -> None:
        """Log the curves and the final status, then drain the journal for at most ``close_timeout_s``.

        Use ``KILLED`` for a preempted attempt: the requeued job reattaches and marks the run RUNNING again.
        """
        if self._closed:
            return
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, got {status!r}")
        self._closed = True
        self._log_curves()
        self.journal.append({"kind": "end", "time": now_ms(), "status": status})
        self.journal.close_writer()
        self._closing.set()
        self._wake.set()
        self._thread.join(self.cfg.close_timeout_s)
        if self._thread.is_alive():
            self._abandon.set()
        left = self.journal.pending_count()
        if left:
            log.warning("tracking: %d records not yet sent to %s; they stay in %s and are sent by the next "
                        "attempt on this run directory or by `python -m itpn_ds.tracking.sync %s`",
                        left, self.uri, self.journal.path, self.journal.directory)

    # -- internals ----------------------------------------------------------------------------------------
    def _wait_until_attached(self) -> None:
        if self._attached.wait(self.cfg.start_timeout_s) and self._fatal is None:
            return
        self._abandon.set()
        reason = f": {self._fatal}" if self._fatal else f" within {self.cfg.start_timeout_s:g} s"
        raise TrackingUnavailable(
            f"MLflow tracking store {self.uri} is not reachable{reason}. Start the server, fix tracking.uri, "
            "set tracking.on_unreachable=defer to train on and send later, or tracking.enabled=false")

    def _log_curves(self) -> None:
        png = draw_curves(metric_history(self.journal.history()), self.cfg.curve_metrics,
                          self.journal.directory / "curves.png")
        self.journal.append({"kind": "artifact", "path": str(png), "artifact_path": "plots"})

    def _send_loop(self) -> None:
        pause = self.cfg.retry_interval_s
        outage = False
        while not self._abandon.is_set():
            try:
                if self._sender.run_id is None:
                    self._sender.attach()
                    self._attached.set()
                sent = self._sender.send_pending()
            except StoreUnavailable as exc:
                if not outage:
                    log.warning("tracking: %s unreachable, buffering on disk in %s (%s)",
                                self.uri, self.journal.path, exc)
                outage = True
                self._abandon.wait(pause)
                pause = min(2 * pause, self.cfg.max_retry_interval_s)
                continue
            except (RecordRejected, ValueError) as exc:  # the stored run is gone, or the URI changed
                log.error("tracking: cannot attach to the MLflow run: %s; records stay in %s",
                          exc, self.journal.path)
                self._fatal = exc
                self._attached.set()
                return
            if outage:
                log.info("tracking: %s reachable again, sending the buffered records", self.uri)
            outage, pause = False, self.cfg.retry_interval_s
            if sent:
                continue
            if self._closing.is_set():
                return
            self._wake.wait(POLL_INTERVAL_S)
            self._wake.clear()
