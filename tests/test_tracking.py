"""MLflow tracking against real stores: the sqlite default and a real `mlflow server` stopped mid-run."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from itpn_ds.distributed import DistEnv
from itpn_ds.tracking import NoOpTracker, TrackingConfig, build_tracker
from itpn_ds.tracking.context import flatten_params
from itpn_ds.tracking.journal import Journal
from itpn_ds.tracking.mlflow_tracker import MLflowTracker, TrackingUnavailable
from itpn_ds.tracking.sender import HTTP_TIMEOUT_ENV, MLflowSender, _http_timeout

FAST = dict(request_timeout_s=1, retry_interval_s=0.2, max_retry_interval_s=1.0, close_timeout_s=60,
            curve_metrics=("train/loss", "train/lr"))


def loss_at(step: int) -> float:
    return 1.0 / (step + 1)


def log_steps(tracker, steps: range) -> None:
    for step in steps:
        tracker.log_metrics({"train/loss": loss_at(step), "train/lr": 1e-3 * step}, step)


def wait_drained(tracker: MLflowTracker, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while tracker.journal.pending_count() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tracker.journal.pending_count() == 0, "journal did not drain while the server was up"


def assert_all_steps(client: MlflowClient, run_id: str, steps: range) -> None:
    history = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert sorted(history) == list(steps)
    assert all(history[step] == pytest.approx(loss_at(step)) for step in steps)


def test_non_zero_rank_and_disabled_tracking_get_noop(tmp_path):
    assert isinstance(build_tracker(TrackingConfig(), rank=1, run_dir=tmp_path), NoOpTracker)
    assert isinstance(build_tracker(TrackingConfig(enabled=False), rank=0, run_dir=tmp_path), NoOpTracker)
    assert not (tmp_path / "tracking").exists() and not (tmp_path / "mlflow.db").exists()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="on_unreachable"):
        TrackingConfig(on_unreachable="maybe")
    with pytest.raises(ValueError, match="request_timeout_s"):
        TrackingConfig(request_timeout_s=0)


def test_flatten_params_nests_with_dots_and_refuses_oversized_values():
    assert flatten_params({"optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "zero": 2}) == {
        "optim.lr": "0.001", "optim.betas": "[0.9, 0.95]", "zero": "2"}
    with pytest.raises(ValueError, match="limits"):
        flatten_params({"big": "x" * 7000})


def without_tracking_env(monkeypatch, home: Path) -> Path:
    """No MLFLOW_* variables and XDG_DATA_HOME at ``home``: the default store, ``home/itpn-ds/mlflow.db``."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    return home.resolve() / "itpn-ds" / "mlflow.db"


def test_the_sender_thread_never_adds_or_removes_an_environment_variable(tmp_path, monkeypatch):
    """A request's timeout replaces the value of a variable the sender set when it was made: adding or removing
    one from the sender thread reallocates the C environment under a process another thread is spawning (an
    ``mlflow server`` started by a test failed so, EFAULT)."""
    monkeypatch.delenv(HTTP_TIMEOUT_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    MLflowSender(f"sqlite:///{tmp_path / 'mlflow.db'}", Journal(tmp_path / "journal"), "e", "r", request_timeout_s=5)
    names = set(os.environ)
    assert os.environ[HTTP_TIMEOUT_ENV] == "5"
    with _http_timeout(600):
        assert set(os.environ) == names and os.environ[HTTP_TIMEOUT_ENV] == "600"
    assert set(os.environ) == names and os.environ[HTTP_TIMEOUT_ENV] == "5"


def test_sqlite_default_logs_everything_and_a_resumed_run_reattaches(tmp_path, monkeypatch):
    store = without_tracking_env(monkeypatch, tmp_path / "xdg")
    run_dir = tmp_path / "run"
    dist = DistEnv(0, 0, 4, "127.0.0.1", 29500, "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "c[1-2]")
    first = build_tracker(TrackingConfig(**FAST), rank=0, run_dir=run_dir, dist=dist)
    assert first.uri == f"sqlite:///{store}" and store.is_file()  # per user, outside the run directory
    assert "single-machine default" in TrackingConfig().describe(run_dir)
    first.log_params({"model": {"depth": 12}, "deepspeed": {"zero_optimization": {"stage": 2}}})
    log_steps(first, range(0, 5))
    config = run_dir / "resolved.yaml"
    config.write_text("model:\n  depth: 12\n")
    first.log_artifact(config, "config")
    first.close("KILLED")  # a preempted attempt

    client = MlflowClient(first.uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "KILLED"
    assert run.data.params["model.depth"] == "12"
    assert run.data.params["deepspeed.zero_optimization.stage"] == "2"
    assert run.data.tags["slurm_job_id"] == "4242" and run.data.tags["world_size"] == "4"
    assert run.data.tags["node_list"] == "c[1-2]" and len(run.data.tags["git_sha"]) in (40, 7)

    # the requeued attempt: same run directory -> same MLflow run, RUNNING again, then FINISHED
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    second = build_tracker(TrackingConfig(**FAST), rank=0, run_dir=run_dir, dist=dist)
    assert second.run_id == first.run_id
    wait_drained(second)  # the start record is sent in the background
    assert client.get_run(first.run_id).info.status == "RUNNING"
    log_steps(second, range(5, 10))
    second.close()
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["slurm_restart_count"] == "1"
    assert_all_steps(client, first.run_id, range(10))
    artifacts = {a.path for a in client.list_artifacts(first.run_id, "config")} | {
        a.path for a in client.list_artifacts(first.run_id, "plots")}
    assert artifacts == {"config/resolved.yaml", "plots/curves.png"}
    png = Path(client.download_artifacts(first.run_id, "plots/curves.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reattach_refuses_another_uri(tmp_path, monkeypatch):
    without_tracking_env(monkeypatch, tmp_path / "xdg")
    build_tracker(TrackingConfig(**FAST), rank=0, run_dir=tmp_path).close()
    other = TrackingConfig(**FAST, uri=f"sqlite:///{tmp_path / 'other.db'}")
    with pytest.raises(ValueError, match="use the same URI"):
        build_tracker(other, rank=0, run_dir=tmp_path)


def test_invalid_record_is_set_aside_and_the_rest_still_arrives(tmp_path, monkeypatch):
    without_tracking_env(monkeypatch, tmp_path / "xdg")
    tracker = build_tracker(TrackingConfig(**FAST), rank=0, run_dir=tmp_path)
    tracker.log_params({"lr": 0.1, "depth": 12})
    tracker.log_params({"lr": 0.2, "width": 768})  # MLflow refuses to change a logged parameter
    log_steps(tracker, range(3))
    tracker.close()
    run = MlflowClient(tracker.uri).get_run(tracker.run_id)
    assert run.data.params == {"lr": "0.1", "depth": "12", "width": "768"}
    rejected = [json.loads(line) for line in tracker.journal.rejected_path.read_text().splitlines()]
    assert [r["record"]["values"] for r in rejected] == [{"lr": "0.2"}]
    assert_all_steps(MlflowClient(tracker.uri), tracker.run_id, range(3))


def test_require_policy_fails_fast_and_clearly_when_the_server_is_unreachable(tmp_path):
    from tests.fixtures.cli import free_port

    cfg = TrackingConfig(**FAST, uri=f"http://127.0.0.1:{free_port()}", start_timeout_s=3)
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="not reachable"):
        build_tracker(cfg, rank=0, run_dir=tmp_path)
    assert time.monotonic() - started < 10


@pytest.mark.mlflow_server
def test_server_outage_mid_run_loses_nothing(tmp_path, mlflow_server_stopped):
    server = mlflow_server_stopped
    cfg = TrackingConfig(**FAST, uri=server.uri, on_unreachable="defer", experiment="outage")
    tracker = build_tracker(cfg, rank=0, run_dir=tmp_path / "run")
    tracker.log_params({"model": {"depth": 12}})
    log_steps(tracker, range(0, 10))  # the server is not up yet: buffered, no run yet
    assert tracker.run_id is None and tracker.journal.pending_count() > 0

    server.start()
    log_steps(tracker, range(10, 20))
    wait_drained(tracker)
    run_id = tracker.run_id

    server.stop()
    started = time.monotonic()
    log_steps(tracker, range(20, 40))
    assert time.monotonic() - started < 1.0, "logging must not wait on the unreachable server"
    time.sleep(2 * FAST["request_timeout_s"])  # the sender is failing and retrying meanwhile
    assert tracker.journal.pending_count() >= 20

    server.start()
    tracker.close()
    assert tracker.journal.pending_count() == 0
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"model.depth": "12"}
    assert_all_steps(client, run_id, range(40))
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/curves.png"]
