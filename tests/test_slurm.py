"""Launches through the project's sbatch scripts on a real local SLURM cluster with two fake nodes."""
from __future__ import annotations

import json

import pytest

from tests.fixtures.slurm import REPO

pytestmark = pytest.mark.slurm
SLURM = REPO / "launch" / "slurm"


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
