"""The real jobs under SLURM on the local two-node cluster: teacher extraction as an array job, then tiny
iTPN pre-training from that cache on two nodes, preempted with USR1 and then losing a rank (SIGKILL), requeued,
resumed and finished in the same MLflow run; and an extraction task stopped by USR1 in the middle of a shard,
requeued and ending where and as an undisturbed job does."""
from __future__ import annotations

import json
import os
import re
import signal

import pytest
from mlflow.tracking import MlflowClient

from itpn_ds.teacher import TeacherCache
from tests.fixtures.slurm import REPO, signal_pending, wait_for, wait_for_file, wait_for_task_pid
from tests.fixtures.teacher import write_tiny_clip_checkpoint

pytestmark = pytest.mark.slurm
SLURM = REPO / "launch" / "slurm"
STEP = re.compile(r"step (\d+) epoch \d+ loss")
STEP_LOSS = re.compile(r"step (\d+) epoch \d+ loss (\S+)")
EVERY = 5  # the pre-training's periodic checkpoints: steps 5 and 10 of its 12


def submit_extraction(slurm_cluster, shards, out, clip, logs):
    """An array job of two one-rank tasks, one sample (two views) per teacher forward."""
    return slurm_cluster.sbatch(SLURM / "extract_teacher.sbatch", "--shards", str(shards), "--out", str(out),
                                "--teacher-checkpoint", str(clip), "--num-views", "2", "--batch-size", "2",
                                "--no-progress",
                                options=("--array=0-1", "-N", "1", "--ntasks-per-node", "1",
                                         f"--output={logs}/%A_%a.out"))


@pytest.fixture(scope="module")
def array_extraction(slurm_cluster, demo_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_extract")
    clip = write_tiny_clip_checkpoint(root / "clip.pt", embed_dim=64)  # teacher_dim of the tiny recipe
    job = submit_extraction(slurm_cluster, demo_shards, root / "cache", clip, root)
    tasks = [slurm_cluster.wait_done(f"{job}_{index}", timeout_s=300) for index in (0, 1)]
    logs = "\n".join(path.read_text() for path in sorted(root.glob("*.out")))
    return root / "cache", tasks, logs


def test_extraction_array_job_covers_every_shard(array_extraction, demo_shards):
    cache, tasks, logs = array_extraction
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks), logs[-3000:]
    shards = json.loads((demo_shards / "manifest.json").read_text())["shards"]
    assert len(list(cache.glob("*.arrow"))) == len(shards) > 1
    TeacherCache(cache, shards=demo_shards)  # opens: every shard present, same sha256 and sample count


def test_extraction_task_stopped_by_usr1_mid_shard_is_requeued_and_writes_the_same_bytes(
        slurm_cluster, array_extraction, demo_shards, tmp_path):
    """Task 0 is held (SIGSTOP) once it writes its first shard, so the USR1 lands mid-shard: the task keeps the
    shard as a partial file, exits with the preemption code, is requeued and continues it; the cache is
    byte for byte the undisturbed array job's."""
    reference = array_extraction[0]
    cache = tmp_path / "cache"
    job = submit_extraction(slurm_cluster, demo_shards, cache, reference.parent / "clip.pt", tmp_path)
    task = f"{job}_0"
    read = lambda: (tmp_path / f"{job}_0.out").read_text() if (tmp_path / f"{job}_0.out").exists() else ""  # noqa: E731
    pid = wait_for_task_pid(120, SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID="0")
    assert wait_for_file(cache / "shard-00000.arrow.tmp", timeout_s=120), read()  # worker 0: shards 0 and 2
    os.kill(pid, signal.SIGSTOP)
    try:
        slurm_cluster.scancel("--batch", "--signal=USR1", task)  # batch shell -> srun -> the task
        assert wait_for(lambda: signal_pending(pid, signal.SIGUSR1), timeout_s=30), read()
    finally:
        os.kill(pid, signal.SIGCONT)

    pending = slurm_cluster.wait_state(task, {"PENDING"}, timeout_s=120)  # requeued by the batch script
    assert pending["Restarts"] == "1", read()
    tasks = [slurm_cluster.wait_done(f"{job}_{index}", timeout_s=300) for index in (0, 1)]
    text = read()
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks), text
    assert re.search(r"stopped in shard-0000[02]\.tar: \S+\.arrow\.partial keeps \d+ of its \d+ samples", text), text
    assert "the step stopped after USR1 with status 85: requeueing job" in text
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in reference.glob("*.arrow"):
        assert (cache / path.name).read_bytes() == path.read_bytes(), path.name


def test_two_node_pretraining_preempted_then_losing_a_rank_resumes_each_time_and_finishes_in_one_mlflow_run(
        slurm_cluster, array_extraction, demo_shards, tmp_path):
    """A two-node pre-training from the array job's cache meets both ways a job stops early: USR1 (preemption: the
    ranks checkpoint at the same step, the batch script requeues the job), then, in its second attempt, the SIGKILL
    of rank 1 (the step fails, the job requeues itself and resumes from its newest complete checkpoint). Each attempt
    starts where the last left off, lost steps repeat with the same losses, and the job ends at an undisturbed run's
    last step in one MLflow run (4 epochs of 3 steps: 40 images over 2 ranks x 8, each epoch's last step short)."""
    cache, run = array_extraction[0], tmp_path / "run"
    job = slurm_cluster.sbatch(SLURM / "pretrain.sbatch", "--config", "tiny_pretrain_cpu", "--run-dir", str(run),
                               f"data.shards={demo_shards}", f"teacher.cache={cache}", "schedule.epochs=4",
                               f"checkpoint.every_steps={EVERY}", f"tracking.uri=sqlite:///{run}/mlflow.db",
                               options=("-N", "2", "--ntasks-per-node", "1", f"--output={tmp_path}/%j.out"))
    log = tmp_path / f"{job}.out"
    read = lambda: log.read_text() if log.exists() else ""  # noqa: E731
    assert wait_for(lambda: len(STEP.findall(read())) >= 3, timeout_s=240), read()[-3000:]
    slurm_cluster.scancel("--batch", "--signal=USR1", job)
    assert slurm_cluster.wait_state(job, {"PENDING"}, timeout_s=120)["Restarts"] == "1", read()[-3000:]

    # killed after its first step, most often before its next periodic checkpoint (2 to 4 steps of 0.1 s later):
    # then its steps are lost and repeated; else it resumes from that checkpoint
    second_attempt = lambda: read().partition("requeueing job")[2]  # noqa: E731
    assert wait_for(lambda: len(STEP.findall(second_attempt())) >= 1, timeout_s=240), read()[-3000:]
    os.kill(wait_for_task_pid(10, SLURM_JOB_ID=job, SLURM_PROCID="1"), signal.SIGKILL)
    assert slurm_cluster.wait_state(job, {"PENDING"}, timeout_s=120)["Restarts"] == "2", read()[-3000:]
    info = slurm_cluster.wait_done(job, timeout_s=300)
    text = read()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    first, second, third = text.split("requeueing job")

    stopped = int(re.search(r"preemption signal: checkpointing at step (\d+)", first).group(1))
    assert min(int(s) for s in STEP.findall(second)) == stopped + 1  # resumed exactly where the preemption stopped
    assert re.search(r"the step failed with status \d+ .*\(the job's failed step 1; .*$", second, re.MULTILINE), second[-3000:]
    saved = [int(s) for s in re.findall(r"checkpoint \S+ saved \(step (\d+),", first + second)]
    resumed = int(re.search(r"resumed from \S+: step (\d+)", third).group(1))
    assert saved and resumed == saved[-1]  # the newest complete checkpoint (said once published, on rank 0)
    killed_attempt, last_attempt = dict(STEP_LOSS.findall(second)), dict(STEP_LOSS.findall(third))
    assert min(int(s) for s in last_attempt) == resumed + 1 and max(int(s) for s in last_attempt) == 12
    if resumed != stopped:  # killed after publishing its periodic checkpoint
        assert resumed % EVERY == 0 and str(resumed) in killed_attempt, (resumed, killed_attempt)
    repeated = set(killed_attempt) & set(last_attempt)  # its lost steps, taken again with the same losses
    assert repeated or resumed != stopped, (killed_attempt, last_attempt)
    assert all(killed_attempt[s] == last_attempt[s] for s in repeated), (killed_attempt, last_attempt)
    steps = sorted({int(s) for s in STEP.findall(text)})
    assert steps == list(range(1, 13))

    client = MlflowClient(f"sqlite:///{run}/mlflow.db")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("itpn-ds").experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["slurm_restart_count"] == "2" and mlflow_run.data.tags["slurm_job_id"] == job
    logged = [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "train/loss")]
    assert sorted(set(logged)) == steps
