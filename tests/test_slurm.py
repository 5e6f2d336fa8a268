"""Launches through the project's sbatch scripts on a real local SLURM cluster with two fake nodes."""
from __future__ import annotations

import json
import re
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from tests.fixtures.slurm import REPO, wait_for

pytestmark = pytest.mark.slurm
SLURM = REPO / "launch" / "slurm"


def steps_logged(journal) -> int:
    """Steps rank 0 has handed to its tracker so far (lines of the tracking journal)."""
    return journal.read_text().count('"check/step"') if journal.exists() else 0


def test_allreduce_check_runs_one_rank_per_node_through_the_sbatch_script(slurm_cluster, tmp_path):
    out = tmp_path / "ranks"
    job = slurm_cluster.sbatch(SLURM / "allreduce_check.sbatch", "--out", str(out),
                               options=("-N", "2", "--ntasks-per-node", "1", f"--output={tmp_path}/%j.out"))
    info = slurm_cluster.wait_done(job, timeout_s=120)
    log = (tmp_path / f"{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    reports = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == [0, 1]
    assert {r["node"] for r in reports} == {"c1", "c2"}
    assert all(r["launcher"] == "slurm" and r["world_size"] == 2 and r["sum"] == 3.0 for r in reports)
    assert len({r["master"] for r in reports}) == 1  # every task derived the same rendezvous


def test_usr1_stops_all_ranks_together_then_the_job_requeues_itself_and_resumes(slurm_cluster, tmp_path):
    """The launch layer's preemption round trip, a second USR1 arriving while the ranks stop, and the
    requeued job continuing the same MLflow run (sqlite store in the run directory)."""
    state, out, run_dir = tmp_path / "state", tmp_path / "ranks", tmp_path / "run"
    state.mkdir()
    job = slurm_cluster.sbatch(SLURM / "allreduce_check.sbatch", "--steps", "40", "--step-seconds", "0.2",
                               "--state", str(state), "--out", str(out), "--tracking-dir", str(run_dir),
                               options=("-N", "2", "--ntasks-per-node", "1", f"--output={tmp_path}/%j.out"))
    log = tmp_path / f"{job}.out"
    journal = run_dir / "tracking" / "journal.jsonl"
    assert wait_for(lambda: steps_logged(journal) >= 3, timeout_s=90), log.read_text() if log.exists() else ""
    slurm_cluster.scancel("--batch", "--signal=USR1", job)
    slurm_cluster.scancel("--batch", "--signal=USR1", job)

    pending = slurm_cluster.wait_state(job, {"PENDING"}, timeout_s=60)  # requeued by the batch script
    assert pending["Restarts"] == "1", log.read_text()
    stopped_at = json.loads((state / "step.json").read_text())["step"]
    assert 0 < stopped_at < 40 and not (state / "done.json").exists()
    # the requeued job runs again once its credential expires (AuthInfo=cred_expire in slurm_cluster.sh)
    info = slurm_cluster.wait_done(job, timeout_s=180)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert json.loads((state / "done.json").read_text()) == {"resumed_from": stopped_at, "steps": 40}
    stops = [json.loads(line)["preempted_at"] for line in text.splitlines() if '"preempted_at"' in line]
    assert stops == [stopped_at, stopped_at]  # both ranks, the same step
    assert "requeueing job" in text
    assert [json.loads(p.read_text())["restart"] for p in sorted(out.glob("rank*.json"))] == [1, 1]

    record = json.loads((run_dir / "tracking" / "run.json").read_text())
    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["slurm_restart_count"] == "1"
    assert run.data.tags["slurm_job_id"] == job and run.data.tags["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(record["run_id"], "check/step")] == list(range(40))
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_array_tasks_each_get_their_own_rendezvous(slurm_cluster, tmp_path):
    """Two array tasks of two ranks each, side by side: separate worlds, separate ports, all sums right."""
    out = tmp_path / "ranks"
    job = slurm_cluster.sbatch(SLURM / "allreduce_check.sbatch", "--out", str(out),
                               options=("--array=0-1", "-N", "1", "--ntasks-per-node", "2",
                                        f"--output={tmp_path}/%A_%a.out"))
    for task in (0, 1):
        info = slurm_cluster.wait_done(f"{job}_{task}", timeout_s=120)
        assert info["JobState"] == "COMPLETED", (tmp_path / f"{job}_{task}.out").read_text()
    reports = {p.name: json.loads(p.read_text()) for p in out.glob("task*-rank*.json")}
    assert sorted(reports) == ["task0-rank0.json", "task0-rank1.json", "task1-rank0.json", "task1-rank1.json"]
    assert all(r["world_size"] == 2 and r["sum"] == 3.0 for r in reports.values())
    masters = {name[:5]: r["master"] for name, r in reports.items()}
    assert masters["task0"] != masters["task1"]


def test_an_input_error_ends_the_job_unrequeued_and_a_one_process_command_refuses_several_tasks(slurm_cluster,
                                                                                               tmp_path):
    """Through the generic script: exit 2 is not requeued (it would fail again); make-shards on two tasks is
    refused on one line before any step starts."""
    bad = slurm_cluster.sbatch(SLURM / "itpn_ds.sbatch", "plan-cache", "--nodes", "0",
                               options=("-n", "1", f"--output={tmp_path}/%j.out"))
    many = slurm_cluster.sbatch(SLURM / "itpn_ds.sbatch", "make-shards", str(tmp_path / "images"), str(tmp_path / "out"),
                                options=("-N", "2", "--ntasks-per-node", "1", f"--output={tmp_path}/%j.out"))
    for job, error in ((bad, "itpn-ds plan-cache: "), (many, "itpn-ds make-shards runs as one process")):
        info = slurm_cluster.wait_done(job, timeout_s=120)
        text = (tmp_path / f"{job}.out").read_text()
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", text
        assert len([line for line in text.splitlines() if error in line]) == 1 and "Traceback" not in text, text
    assert "not requeued" in (tmp_path / f"{bad}.out").read_text()
    assert not (tmp_path / "out").exists()


def test_a_step_that_keeps_failing_is_requeued_at_most_max_failures_times_and_keeps_the_jobs_comment(slurm_cluster,
                                                                                                   tmp_path):
    """A step that exits 3 at every attempt (a bug, not a lost node) under ITPN_DS_MAX_FAILURES=1: requeued
    once, then the job ends FAILED with the step's status; the count lives in the job's Comment, beside the
    submitter's own."""
    script = tmp_path / "always_fails.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --requeue\n#SBATCH --open-mode=append\nset -uo pipefail\n"
                      f"source {SLURM / 'lib.sh'}\n"
                      "itpn_job -c 'import sys; print(\"attempt\", flush=True); sys.exit(3)'\n")
    job = slurm_cluster.sbatch(script, options=("-n", "1", "--comment=team-x", "--export=ALL,ITPN_DS_MAX_FAILURES=1",
                                                f"--output={tmp_path}/%j.out"))
    info = slurm_cluster.wait_done(job, timeout_s=120)
    text = (tmp_path / f"{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0" and info["Restarts"] == "1", text
    assert text.count("attempt") == 2 and text.count("requeueing job") == 1, text
    assert "failed step 2, past ITPN_DS_MAX_FAILURES=1" in text, text
    shown = subprocess.run(["scontrol", "show", "job", job], env=slurm_cluster.env, capture_output=True, text=True,
                           timeout=30, check=True).stdout  # the multi-line form: one field per line holds spaces
    assert re.search(r"^\s*Comment=team-x itpn-ds-failures=2\s*$", shown, re.M), shown
