"""Pre-flight check of a launch: rendezvous, all-reduce, and (optionally) the preemption round trip.

Runs under any launcher ``itpn_ds.distributed.detect`` knows (srun, torchrun, deepspeed). Backend: nccl
with CUDA, gloo otherwise. Each rank prints one JSON line (rank, local rank, world, master, node, sum);
with ``--out DIR`` it also writes ``DIR/rank<r>.json``. Exit status 1 if a sum is wrong.

With ``--steps N --state DIR`` it runs N all-reduce steps and checks the signal path of a cluster before
a long job trusts it: SIGUSR1 on any rank sets a flag, the ranks agree at the next step (an all-reduce of
the flag), rank 0 records the step in DIR atomically, and every rank exits with ``--preempted-exit-code``,
which the sbatch scripts answer with a requeue; the requeued job starts again from the recorded step.

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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write one JSON file per rank here")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="rendezvous and collective timeout")
    parser.add_argument("--steps", type=int, default=0, help="all-reduce steps of the preemption check")
    parser.add_argument("--step-seconds", type=float, default=0.5, help="pause between steps")
    parser.add_argument("--state", type=Path, default=None, help="where the preemption check records its step")
    parser.add_argument("--preempted-exit-code", type=int, default=85)
    args = parser.parse_args()
    if args.steps and args.state is None:
        parser.error("--steps needs --state")
    return args


def all_reduce_sum(value: float, device: str) -> float:
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor)
    return tensor.item()


def run_steps(args: argparse.Namespace, env: DistEnv, device: str) -> int:
    """The preemption round trip; returns the process exit status."""
    requested = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: requested.append(signum))
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
            return args.preempted_exit_code
        time.sleep(args.step_seconds)
    if env.is_main:
        (args.state / "done.json").write_text(json.dumps({"resumed_from": start, "steps": args.steps}))
    return 0


def main() -> int:
    args = parse_args()
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
        (args.out / f"rank{env.rank}.json").write_text(json.dumps(report))
    status = 1 if total != expected else run_steps(args, env, device) if args.steps else 0
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
