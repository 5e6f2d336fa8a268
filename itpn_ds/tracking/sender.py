"""Sends a journal's records to MLflow, in order, and remembers which MLflow run they belong to.

The only module that talks to MLflow. Failures come out as one of two errors:
``StoreUnavailable`` (the store cannot be reached or timed out: retry later, keep the records) and
``RecordRejected`` (the store answered that the request is invalid: retrying cannot help).
"""
from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from itpn_ds.tracking.journal import Entry, Journal

log = logging.getLogger(__name__)

# MLflow error codes that mean "this request is wrong" (anything else is treated as an outage).
_INVALID_REQUEST_CODES = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST",
                                    "RESOURCE_ALREADY_EXISTS", "INVALID_STATE"})
# log_batch limits of the MLflow REST API.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100


class StoreUnavailable(RuntimeError):
    """The tracking store did not answer (down, unreachable, timed out)."""


class RecordRejected(RuntimeError):
    """The tracking store refused a request as invalid."""


@dataclass(frozen=True)
class RunRecord:
    """Which MLflow run a run directory belongs to; stored as ``run.json`` next to the journal."""

    run_id: str
    experiment_id: str
    tracking_uri: str

    @staticmethod
    def load(path: Path) -> "RunRecord | None":
        if not path.exists():
            return None
        return RunRecord(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)


@contextmanager
def _mlflow_errors() -> Iterator[None]:
    """Translate whatever MLflow or the network raises into StoreUnavailable / RecordRejected."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        if exc.error_code in _INVALID_REQUEST_CODES:
            raise RecordRejected(str(exc)) from exc
        raise StoreUnavailable(str(exc)) from exc
    except (OSError, TimeoutError) as exc:
        raise StoreUnavailable(str(exc)) from exc
    except Exception as exc:  # the sqlite store raises SQLAlchemy errors (locked, disk I/O) as-is
        if type(exc).__module__.startswith("sqlalchemy"):
            raise StoreUnavailable(str(exc)) from exc
        raise


HTTP_TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"  # MLflow's REST client reads it at each request (whole seconds)


def _set_http_timeout(seconds: float) -> None:
    os.environ[HTTP_TIMEOUT_ENV] = str(max(1, math.ceil(seconds)))


@contextmanager
def _http_timeout(seconds: float) -> Iterator[None]:
    """MLflow's requests in this block time out after ``seconds``. The sender thread only replaces the value of
    the variable, which ``MLflowSender`` sets before that thread starts: adding or removing a variable
    reallocates the process's C environment, and a process that another thread spawns meanwhile (vfork, then
    exec of that environment) can then fail with EFAULT ("Bad address"), as an ``mlflow server`` started by a
    test did while the sender retried."""
    previous = os.environ[HTTP_TIMEOUT_ENV]
    _set_http_timeout(seconds)
    try:
        yield
    finally:
        os.environ[HTTP_TIMEOUT_ENV] = previous


class MLflowSender:
    """Creates or reattaches the run, then sends journal records to it in order."""

    def __init__(self, uri: str, journal: Journal, experiment: str, run_name: str,
                 artifact_location: str = "", request_timeout_s: float = 5.0,
                 artifact_timeout_s: float = 600.0) -> None:
        self.uri = uri
        self.journal = journal
        self.experiment = experiment
        self.run_name = run_name
        self.artifact_location = artifact_location or _default_artifact_location(uri)
        self.request_timeout_s = request_timeout_s
        self.artifact_timeout_s = artifact_timeout_s
        self.state_path = journal.directory / "run.json"
        self.run_id: str | None = None
        self._client = None
        # MLflow's own retry loop would block for minutes; this sender retries itself, between sends. Both
        # variables are set here, in the thread that makes the sender, and never added or removed by the sender
        # thread (``_http_timeout``).
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        _set_http_timeout(request_timeout_s)

    def check_run_record(self) -> RunRecord | None:
        """The stored run, if any; a clear error when it was tracked at another URI."""
        record = RunRecord.load(self.state_path)
        if record is not None and record.tracking_uri != self.uri:
            raise ValueError(f"{self.state_path} belongs to MLflow run {record.run_id} at "
                             f"{record.tracking_uri!r}, but tracking is configured for {self.uri!r}; "
                             "use the same URI to continue the run, or a new run directory")
        return record

    def attach(self) -> str:
        """Reattach to the stored run, or create the experiment (if needed) and a new run."""
        record = self.check_run_record()
        with _mlflow_errors(), _http_timeout(self.request_timeout_s):
            client = self._mlflow_client()
            if record is not None:
                client.get_run(record.run_id)
                self.run_id = record.run_id
                log.info("tracking: reattached to MLflow run %s at %s", self.run_id, self.uri)
                return self.run_id
            experiment_id = self._experiment_id(client)
            run = client.create_run(experiment_id, run_name=self.run_name)
        RunRecord(run.info.run_id, experiment_id, self.uri).save(self.state_path)
        self.run_id = run.info.run_id
        log.info("tracking: created MLflow run %s (experiment %r) at %s", self.run_id, self.experiment, self.uri)
        return self.run_id

    def send_pending(self, limit: int = 2000) -> int:
        """Send up to ``limit`` pending records; returns how many were consumed (sent or rejected)."""
        entries = self.journal.pending(limit)
        for group in _groups(entries):
            self._send_group(group)
            self.journal.advance(group[-1].end_offset)
        return len(entries)

    # -- internals ----------------------------------------------------------------------------------------
    def _mlflow_client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            database = _sqlite_path(self.uri)
            if database is not None:  # sqlite creates the file, not its directory (the default store's)
                database.parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _experiment_id(self, client) -> str:
        from mlflow.exceptions import MlflowException

        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(self.experiment, artifact_location=self.artifact_location or None)
        except MlflowException as exc:  # another run created it meanwhile
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return client.get_experiment_by_name(self.experiment).experiment_id

    def _send_group(self, group: list[Entry]) -> None:
        """Send a group; if the store rejects it, send its items one by one and set aside only the bad ones."""
        records = [entry.record for entry in group]
        try:
            self._send_records(records)
        except RecordRejected:
            for single in (item for record in records for item in _split(record)):
                try:
                    self._send_records([single])
                except RecordRejected as exc:
                    log.error("tracking: MLflow rejected %s; kept in %s: %s", single, self.journal.rejected_path, exc)
                    self.journal.reject(single, str(exc))

    def _send_records(self, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = self._mlflow_client()
        kind = records[0]["kind"]
        timeout = self.artifact_timeout_s if kind == "artifact" else self.request_timeout_s
        with _mlflow_errors(), _http_timeout(timeout):
            if kind == "metrics":
                metrics = [Metric(key, float(value), record["time"], record["step"])
                           for record in records for key, value in record["values"].items()]
                client.log_batch(self.run_id, metrics=metrics)
            elif kind == "params":
                items = [Param(key, value) for key, value in records[0]["values"].items()]
                for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
                    client.log_batch(self.run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])
            elif kind == "tags":
                items = [RunTag(key, value) for key, value in records[0]["values"].items()]
                for start in range(0, len(items), MAX_TAGS_PER_BATCH):
                    client.log_batch(self.run_id, tags=items[start:start + MAX_TAGS_PER_BATCH])
            elif kind == "artifact":
                self._send_artifact(client, records[0])
            elif kind == "start":
                client.update_run(self.run_id, status=records[0]["status"])
            elif kind == "end":
                client.set_terminated(self.run_id, status=records[0]["status"], end_time=records[0]["time"])
            else:
                raise RecordRejected(f"unknown journal record kind {kind!r}")

    def _send_artifact(self, client, record: dict[str, Any]) -> None:
        path = Path(record["path"])
        if not path.exists():
            raise RecordRejected(f"artifact {path} no longer exists")
        client.log_artifact(self.run_id, str(path), record.get("artifact_path"))


def _groups(entries: list[Entry]) -> Iterator[list[Entry]]:
    """Consecutive metrics records go in one batch (up to MLflow's limit); every other record alone."""
    batch: list[Entry] = []
    size = 0
    for entry in entries:
        if entry.record["kind"] != "metrics":
            if batch:
                yield batch
                batch, size = [], 0
            yield [entry]
            continue
        count = len(entry.record["values"])
        if batch and size + count > MAX_METRICS_PER_BATCH:
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += count
    if batch:
        yield batch


def _split(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A record with several values as records of one value each (to isolate the one the store rejects)."""
    if "values" not in record or len(record["values"]) <= 1:
        return [record]
    return [{**record, "values": {key: value}} for key, value in record["values"].items()]


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other store."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) else None


def _default_artifact_location(uri: str) -> str:
    """A sqlite store keeps artifacts next to its database file; a server chooses its own."""
    database = _sqlite_path(uri)
    return (database.parent / "mlartifacts").resolve().as_uri() if database is not None else ""
