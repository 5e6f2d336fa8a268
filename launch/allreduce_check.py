"""Pre-flight check of a launch: every rank joins the rendezvous and one all-reduce gives the right sum.

Runs under any launcher ``itpn_ds.distributed.detect`` knows (srun, torchrun, deepspeed). Each rank
prints one JSON line (rank, local rank, world, master, node, sum); with ``--out DIR`` it also writes
``DIR/rank<r>.json``. Exit status 1 if the sum is wrong. Backend: nccl with CUDA, gloo otherwise.

    sbatch -N 2 --ntasks-per-node 8 --gpus-per-node 8 launch/slurm/allreduce_check.sbatch
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from itpn_ds.distributed import detect, export


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write one JSON file per rank here")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="rendezvous and collective timeout")
    args = parser.parse_args()

    env = detect()
    export(env)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=args.timeout_s))
    value = torch.tensor([float(env.rank + 1)], device="cuda" if use_cuda else "cpu")
    dist.all_reduce(value)
    expected = env.world_size * (env.world_size + 1) / 2
    report = {"rank": env.rank, "local_rank": env.local_rank, "world_size": env.world_size,
              "launcher": env.launcher, "master": f"{env.master_addr}:{env.master_port}",
              "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
              "sum": value.item(), "expected": expected}
    print(json.dumps(report), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"rank{env.rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
    return 0 if value.item() == expected else 1


if __name__ == "__main__":
    sys.exit(main())
