"""The real jobs under SLURM on the local two-node cluster: teacher extraction as an array job, then tiny
iTPN pre-training from that cache on two nodes, preempted with USR1, requeued, resumed and finished in the
same MLflow run."""
from __future__ import annotations

import json
import re

import pytest
from mlflow.tracking import MlflowClient

from itpn_ds.teacher import TeacherCache
from tests.fixtures.slurm import REPO, wait_for
from tests.fixtures.teacher import write_tiny_clip_checkpoint

pytestmark = pytest.mark.slurm
SLURM = REPO / "launch" / "slurm"
STEP = re.compile(r"step (\d+) epoch \d+ loss")


@pytest.fixture(scope="module")
def array_extraction(slurm_cluster, demo_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_extract")
    clip = write_tiny_clip_checkpoint(root / "clip.pt", embed_dim=64)  # teacher_dim of the tiny recipe
    job = slurm_cluster.sbatch(SLURM / "extract_teacher.sbatch", "--shards", str(demo_shards),
                               "--out", str(root / "cache"), "--teacher-checkpoint", str(clip), "--num-views", "2",
                               "--no-progress",
                               options=("--array=0-1", "-N", "1", "--ntasks-per-node", "1",
                                        f"--output={root}/%A_%a.out"))
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
