"""Pre-flight check of a launch: rendezvous, all-reduce, and (optionally) the preemption round trip.

Runs under any launcher ``itpn_ds.distributed.detect`` knows (srun, torchrun, deepspeed). Backend: nccl
with CUDA, gloo otherwise. Each rank prints one JSON line (rank, local rank, world, master, node, sum);
with ``--out DIR`` it also writes ``DIR/rank<r>.json`` (``DIR/task<i>-rank<r>.json`` in array task i).
Exit status 1 if a sum is wrong.

With ``--steps N --state DIR`` it runs N all-reduce steps and checks the signal path of a cluster before
a long job trusts it: SIGUSR1 on any rank sets a flag, the ranks agree at the next step (an all-reduce of
the flag), rank 0 records the step in DIR atomically, and every rank exits with ``--preempted-exit-code``,
which the sbatch scripts answer with a requeue; the requeued job starts again from the recorded step.
With ``--tracking-dir DIR`` rank 0 also logs each step to MLflow (``$MLFLOW_TRACKING_URI``, else a sqlite
file in DIR): the requeued job must continue the same MLflow run.

    sbatch -N 2 --ntasks-per-node 8 --gpus-per-node 8 launch/slurm/allreduce_check.sbatch
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from itpn_ds.distributed import DistEnv, detect, export
from itpn_ds.tracking import NoOpTracker, Tracker, TrackingConfig, build_tracker


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write one JSON file per rank here")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="rendezvous and collective timeout")
    parser.add_argument("--steps", type=int, default=0, help="all-reduce steps of the preemption check")
    parser.add_argument("--step-seconds", type=float, default=0.5, help="pause between steps")
    parser.add_argument("--state", type=Path, default=None, help="where the preemption check records its step")
    parser.add_argument("--preempted-exit-code", type=int, default=85)
    parser.add_argument("--tracking-dir", type=Path, default=None, help="log the steps to MLflow (rank 0)")
    args = parser.parse_args()
    if args.steps and args.state is None:
        parser.error("--steps needs --state")
    return args


def all_reduce_sum(value: float, device: str) -> float:
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor)
    return tensor.item()


def run_steps(args: argparse.Namespace, env: DistEnv, device: str, tracker: Tracker,
              requested: list[int]) -> int:
    """The preemption round trip (``requested`` fills up with the signals received); returns the exit status."""
    state_file = args.state / "step.json"
    start = json.loads(state_file.read_text())["step"] if state_file.exists() else 0
    for step in range(start, args.steps):
        if all_reduce_sum(float(bool(requested)), device) > 0:  # every rank stops at the same step
            if env.is_main:
                tmp = state_file.with_suffix(".tmp")
                tmp.write_text(json.dumps({"step": step, "signals": len(requested)}))
                os.replace(tmp, state_file)
            dist.barrier()
            print(json.dumps({"rank": env.rank, "preempted_at": step}), flush=True)
            tracker.close("KILLED")
            return args.preempted_exit_code
        tracker.log_metrics({"check/step": float(step)}, step)
        time.sleep(args.step_seconds)
    tracker.close("FINISHED")
    if env.is_main:
        (args.state / "done.json").write_text(json.dumps({"resumed_from": start, "steps": args.steps}))
    return 0


def main() -> int:
    args = parse_args()
    requested: list[int] = []
    if args.steps:  # from the start: USR1's default action would kill the process
        signal.signal(signal.SIGUSR1, lambda signum, frame: requested.append(signum))
    env = detect()
    export(env)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    device = "cuda" if use_cuda else "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=args.timeout_s))
    total = all_reduce_sum(float(env.rank + 1), device)
    expected = env.world_size * (env.world_size + 1) / 2
    report = {"rank": env.rank, "local_rank": env.local_rank, "world_size": env.world_size,
              "launcher": env.launcher, "master": f"{env.master_addr}:{env.master_port}",
              "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
              "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)), "sum": total, "expected": expected}
    print(json.dumps(report), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        array_task = os.environ.get("SLURM_ARRAY_TASK_ID")
        prefix = f"task{array_task}-" if array_task is not None else ""
        (args.out / f"{prefix}rank{env.rank}.json").write_text(json.dumps(report))
    if total != expected:
        status = 1
    elif args.steps:
        tracker = NoOpTracker() if args.tracking_dir is None else build_tracker(
            TrackingConfig(experiment="allreduce-check"), env.rank, args.tracking_dir, env)
        status = run_steps(args, env, device, tracker, requested)
    else:
        status = 0
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
