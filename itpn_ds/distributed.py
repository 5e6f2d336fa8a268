"""Rank, world size and rendezvous from whichever launcher started this process.

Supported launchers, detected in this order:
- torchrun and the ``deepspeed`` launcher: they export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT.
- SLURM ``srun`` (one task per GPU): SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS; the master is the first
  host of SLURM_JOB_NODELIST (its NodeAddr as ``scontrol`` reports it) and the port is derived from the
  job id, so every task computes the same rendezvous without talking to the others.
- none of the above: a single process (rank 0 of 1).
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

PORT_BASE = 20000
PORT_SPAN = 20000


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def port_for_job(job_id: str | int) -> int:
    """A rendezvous port every task of a SLURM job derives alike from its job id."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def first_node_address(nodelist: str) -> str:
    """The address of the first host of a SLURM node list (``c[1-2]`` -> NodeAddr of ``c1``)."""
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                           capture_output=True, text=True).stdout.split()
    if not hosts:
        raise RuntimeError(f"scontrol found no hosts in SLURM node list {nodelist!r}")
    node = subprocess.run(["scontrol", "show", "node", hosts[0]], capture_output=True, text=True)
    for field in node.stdout.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return hosts[0]


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    """Read the launcher's environment; see the module docstring for the precedence."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)),
                       world_size=int(env["WORLD_SIZE"]), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(env.get("MASTER_PORT", 29500)), launcher="torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = env.get("SLURM_JOB_ID", "0")
        addr = env.get("MASTER_ADDR") or first_node_address(env["SLURM_JOB_NODELIST"])
        port = int(env.get("MASTER_PORT") or port_for_job(job_id))
        return DistEnv(rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)),
                       world_size=int(env["SLURM_NTASKS"]), master_addr=addr, master_port=port,
                       launcher="slurm")
    return DistEnv(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1",
                   master_port=int(env.get("MASTER_PORT", 29500)), launcher="single")


def export(dist: DistEnv) -> None:
    """Write the torch.distributed variables so ``deepspeed.init_distributed`` finds them."""
    os.environ.update(RANK=str(dist.rank), LOCAL_RANK=str(dist.local_rank), WORLD_SIZE=str(dist.world_size),
                      MASTER_ADDR=dist.master_addr, MASTER_PORT=str(dist.master_port))
