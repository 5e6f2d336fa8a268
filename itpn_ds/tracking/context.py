"""What a run records about itself: flattened parameters and the tags that say where it ran."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any, Mapping

from itpn_ds.distributed import DistEnv

# MLflow limits (REST API): longer keys or values are rejected by the server.
MAX_PARAM_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys (``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": "0.001"}``).

    Lists and other leaves become their ``str``; a key or value over MLflow's limits is a ValueError here
    rather than a rejected record later.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name))
            continue
        text = str(value)
        if len(name) > MAX_PARAM_KEY_LENGTH or len(text) > MAX_PARAM_VALUE_LENGTH:
            raise ValueError(f"parameter {name[:80]!r} exceeds MLflow's limits "
                             f"({MAX_PARAM_KEY_LENGTH} key / {MAX_PARAM_VALUE_LENGTH} value characters); "
                             "log it as an artifact instead")
        flat[name] = text
    return flat


def git_sha(directory: Path | None = None) -> str:
    """HEAD of the checkout this package runs from ("unknown" outside a git checkout)."""
    where = directory or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def run_tags(dist: DistEnv, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tags of this attempt: code version, world, and (under SLURM) job, array task, nodes and requeues."""
    env = os.environ if environ is None else environ
    sha = git_sha()
    tags = {
        "git_sha": sha,
        "mlflow.source.git.commit": sha,
        "world_size": str(dist.world_size),
        "launcher": dist.launcher,
        "node_list": env.get("SLURM_JOB_NODELIST", socket.gethostname()),
    }
    slurm = {"slurm_job_id": "SLURM_JOB_ID", "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
             "slurm_array_task_id": "SLURM_ARRAY_TASK_ID", "slurm_restart_count": "SLURM_RESTART_COUNT",
             "slurm_num_nodes": "SLURM_JOB_NUM_NODES"}
    tags.update({tag: env[var] for tag, var in slurm.items() if var in env})
    return tags
