"""launch/local.sh runs the same entry under torchrun and under the DeepSpeed launcher (2 CPU ranks, gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.dist


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_local_launcher_runs_a_two_rank_all_reduce(launcher, tmp_path):
    env = {**os.environ, "ITPN_DS_PYTHON": sys.executable, "DS_ACCELERATOR": "cpu",
           "MASTER_PORT": str(free_port())}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(var, None)
    run = subprocess.run([str(REPO / "launch" / "local.sh"), launcher, "-n", "2", "--",
                          str(REPO / "launch" / "allreduce_check.py"), "--out", str(tmp_path)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    reports = sorted((json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")), key=lambda r: r["rank"])
    assert [(r["rank"], r["local_rank"], r["world_size"], r["sum"]) for r in reports] == [(0, 0, 2, 3.0),
                                                                                          (1, 1, 2, 3.0)]
    assert {r["master"] for r in reports} == {f"127.0.0.1:{env['MASTER_PORT']}"}
