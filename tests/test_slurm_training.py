"""The real jobs under SLURM on the local two-node cluster: teacher extraction as an array job, then tiny
iTPN pre-training from that cache on two nodes, preempted with USR1, requeued, resumed and finished in the
same MLflow run; then the same jobs losing a rank (SIGKILL) and an extraction task stopped by USR1 in the
middle of a shard, both requeued and ending where and as an undisturbed job does."""
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


def test_two_node_pretraining_is_preempted_requeued_and_finishes_in_one_mlflow_run(
        slurm_cluster, array_extraction, demo_shards, tmp_path):
    cache = array_extraction[0]
    run = tmp_path / "run"
    job = slurm_cluster.sbatch(SLURM / "pretrain.sbatch", "--config", "tiny_pretrain_cpu", "--run-dir", str(run),
                               f"data.shards={demo_shards}", f"teacher.cache={cache}", "schedule.epochs=6",
                               "checkpoint.every_steps=2", f"tracking.uri=sqlite:///{run}/mlflow.db",
                               options=("-N", "2", "--ntasks-per-node", "1", f"--output={tmp_path}/%j.out"))
    log = tmp_path / f"{job}.out"
    read = lambda: log.read_text() if log.exists() else ""  # noqa: E731
    assert wait_for(lambda: len(STEP.findall(read())) >= 3, timeout_s=240), read()[-3000:]
    slurm_cluster.scancel("--batch", "--signal=USR1", job)

    pending = slurm_cluster.wait_state(job, {"PENDING"}, timeout_s=120)  # requeued by the batch script
    assert pending["Restarts"] == "1", read()[-3000:]
    info = slurm_cluster.wait_done(job, timeout_s=300)
    text = read()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert "preemption signal: checkpointing at step" in text and "requeueing job" in text
    steps = [int(s) for s in STEP.findall(text)]
    stopped = int(re.search(r"preemption signal: checkpointing at step (\d+)", text).group(1))
    first_after_restart = steps[steps.index(stopped) + 1] if stopped in steps else steps[-1]
    assert first_after_restart == stopped + 1  # resumed exactly where the preempted attempt stopped
    assert max(steps) == steps[-1] and sorted(set(steps)) == list(range(1, max(steps) + 1))

    client = MlflowClient(f"sqlite:///{run}/mlflow.db")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("itpn-ds").experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["slurm_restart_count"] == "1" and mlflow_run.data.tags["slurm_job_id"] == job
    logged = [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "train/loss")]
    assert sorted(set(logged)) == list(range(1, max(steps) + 1))


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


def test_a_rank_killed_mid_run_requeues_the_job_which_resumes_from_its_newest_checkpoint(
        slurm_cluster, array_extraction, demo_shards, tmp_path):
    """SIGKILL of rank 1 of a two-node pre-training: the step fails, the job requeues itself, resumes from the
    newest complete checkpoint, repeats the lost steps with the same losses and ends at the same step as an
    undisturbed run (3 epochs of 3 steps: 40 images over 2 ranks x 8, the last step short)."""
    cache, run = array_extraction[0], tmp_path / "run"
    job = slurm_cluster.sbatch(SLURM / "pretrain.sbatch", "--config", "tiny_pretrain_cpu", "--run-dir", str(run),
                               f"data.shards={demo_shards}", f"teacher.cache={cache}", "schedule.epochs=3",
                               "checkpoint.every_steps=3",
                               options=("-N", "2", "--ntasks-per-node", "1", f"--output={tmp_path}/%j.out"))
    log = tmp_path / f"{job}.out"
    read = lambda: log.read_text() if log.exists() else ""  # noqa: E731
    assert wait_for(lambda: len(STEP.findall(read())) >= 4, timeout_s=240), read()[-3000:]
    os.kill(wait_for_task_pid(10, SLURM_JOB_ID=job, SLURM_PROCID="1"), signal.SIGKILL)

    pending = slurm_cluster.wait_state(job, {"PENDING"}, timeout_s=120)
    assert pending["Restarts"] == "1", read()[-3000:]
    info = slurm_cluster.wait_done(job, timeout_s=300)
    text = read()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert re.search(r"the step failed with status \d+ .*: requeueing job", text), text[-3000:]
    before, after = text.split("requeueing job", 1)
    saved = [int(s) for s in re.findall(r"checkpoint \S+ saved \(step (\d+),", before)]
    resumed = int(re.search(r"resumed from \S+: step (\d+)", after).group(1))
    assert saved and resumed == saved[-1]  # the newest complete checkpoint
    first, second = dict(STEP_LOSS.findall(before)), dict(STEP_LOSS.findall(after))
    assert min(int(s) for s in second) == resumed + 1 and max(int(s) for s in second) == 9
    repeated = set(first) & set(second)
    assert repeated and all(first[s] == second[s] for s in repeated), (first, second)
