"""Rank, world size and rendezvous from whichever launcher started this process.

Supported launchers, detected in this order:
- torchrun and the ``deepspeed`` launcher: they export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT.
- a SLURM ``srun`` step (one task per GPU): SLURM_PROCID, SLURM_LOCALID and the step's task count. The
  master is the first host of the step's node list (its NodeAddr as ``scontrol`` reports it) and the port
  is derived from the job id, so every task computes the same rendezvous without talking to the others.
  MASTER_ADDR / MASTER_PORT in the environment win (the sbatch scripts compute them once per job with
  ``python -m itpn_ds.distributed``, sparing the controller one ``scontrol`` call per task).
  Only a step counts: a batch script also carries SLURM_PROCID/SLURM_NTASKS, but it is one process.
- none of the above: a single process (rank 0 of 1) on MASTER_PORT, or on a free local port when unset.
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping

# Rendezvous ports derived from job ids stay below Linux's ephemeral range (32768-60999), where an
# outgoing connection could hold the port.
PORT_BASE = 20000
PORT_SPAN = 10000


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
    hosts = _scontrol("show", "hostnames", nodelist).split()
    if not hosts:
        raise RuntimeError(f"scontrol found no hosts in SLURM node list {nodelist!r}")
    for field in _scontrol("show", "node", hosts[0]).split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return hosts[0]


def slurm_rendezvous(env: Mapping[str, str]) -> tuple[str, int]:
    """(master address, port) of a SLURM job or step: environment overrides first, then derived."""
    if "SLURM_JOB_ID" not in env:
        raise RuntimeError("not inside a SLURM job: SLURM_JOB_ID is not set")
    nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    addr = env.get("MASTER_ADDR") or first_node_address(nodelist)
    port = int(env.get("MASTER_PORT") or port_for_job(env["SLURM_JOB_ID"]))
    return addr, port


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's environment; see the module docstring for the precedence."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)),
                       world_size=int(env["WORLD_SIZE"]), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(env.get("MASTER_PORT", 29500)), launcher="torchrun")
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        addr, port = slurm_rendezvous(env)
        world = env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]
        return DistEnv(rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)),
                       world_size=int(world), master_addr=addr, master_port=port, launcher="slurm")
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else free_local_port()
    return DistEnv(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1", master_port=port, launcher="single")


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 now: a single process rendezvouses with itself, so two single-process
    commands on one machine (or one beside a torchrun job on 29500) must not share a fixed port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export(dist: DistEnv) -> None:
    """Write the torch.distributed variables so ``deepspeed.init_distributed`` finds them."""
    os.environ.update(RANK=str(dist.rank), LOCAL_RANK=str(dist.local_rank), WORLD_SIZE=str(dist.world_size),
                      MASTER_ADDR=dist.master_addr, MASTER_PORT=str(dist.master_port))


def _scontrol(*args: str) -> str:
    try:
        return subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True,
                              timeout=60).stdout
    except FileNotFoundError as exc:
        raise RuntimeError("scontrol is not on PATH: cannot resolve the SLURM master; set MASTER_ADDR") from exc
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"scontrol {' '.join(args)} failed: {exc.stderr.strip()}") from exc


def main(argv: list[str] | None = None) -> int:
    """``python -m itpn_ds.distributed --export``: print the job's rendezvous as shell exports."""
    parser = argparse.ArgumentParser(prog="python -m itpn_ds.distributed", description=main.__doc__)
    parser.add_argument("--export", action="store_true", required=True,
                        help="print `export MASTER_ADDR=... MASTER_PORT=...` for this SLURM job")
    parser.parse_args(argv)
    addr, port = slurm_rendezvous(os.environ)
    print(f"export MASTER_ADDR={shlex.quote(addr)} MASTER_PORT={port}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
