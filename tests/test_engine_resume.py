"""Exact resume after SIGKILL and non-finite handling, 2 gloo ranks under torchrun (real DeepSpeed); and a
ZeRO-2 start of a model with an odd parameter count (the "auto" buckets rounded to DeepSpeed's alignment)."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.fixtures.cli import free_port

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[1]


def run_ranks(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "tests.fixtures.engine", str(run_dir), *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def trained_keys_by_step(run_dir: Path) -> dict[int, list[str]]:
    """Last record of each (rank, step): a resumed run's replay replaces what the killed run did after the
    checkpoint it resumed from."""
    by_step: dict[int, list[str]] = {}
    for rank in (0, 1):
        last: dict[int, list[str]] = {}
        for line in (run_dir / f"seen_rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            last[rec["step"]] = rec["keys"]
        for step, keys in last.items():
            by_step.setdefault(step, []).extend(keys)
    return by_step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return run_dir, result(run_ranks(run_dir))


def test_sigkilled_rank_resumes_to_bitwise_identical_weights_seeing_each_sample_once(uninterrupted, tmp_path):
    ref_dir, ref = uninterrupted
    killed = run_ranks(tmp_path, "debug.kill_at_step=[1, 11]")
    assert killed.returncode != 0 and "SIGKILL" in killed.stdout + killed.stderr
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    resumed = result(run_ranks(tmp_path))
    assert resumed["state"]["step"] == ref["state"]["step"] == 16
    want = torch.load(ref_dir / "final_weights.pt")
    got = torch.load(tmp_path / "final_weights.pt")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    steps_per_epoch = 8
    by_step = trained_keys_by_step(tmp_path)
    assert sorted(by_step) == list(range(16))
    for epoch in range(2):
        keys = [k for s in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch) for k in by_step[s]]
        assert Counter(keys) == Counter(f"e{epoch}-{i}" for i in range(64))


@pytest.fixture(scope="module")
def odd_model_through_nan_steps(tmp_path_factory):
    """One 2-rank ZeRO-2 run for two tests: the 5-class SmallNet (an odd parameter count) with non-finite losses
    injected at steps 6, 7, 8 (a rollback after 3 in a row) and 13 (skipped alone). (run dir, stdout, RESULT)."""
    run_dir = tmp_path_factory.mktemp("odd_nan")
    out = run_ranks(run_dir, "finetune.num_classes=5", "debug.inject_nan_at_steps=[6, 7, 8, 13]",
                    "nonfinite.max_consecutive=3")
    return run_dir, out.stdout, result(out)


def test_nan_steps_are_skipped_then_rolled_back_and_their_batches_skipped(odd_model_through_nan_steps):
    run_dir, stdout, res = odd_model_through_nan_steps
    assert res["state"]["skipped_steps"] == 4 and res["state"]["rollbacks"] == 1
    assert res["state"]["skip_steps"] == [5, 6, 7]  # 0-based steps 6..8
    assert "rolling back to" in stdout and "step 6: batches skipped" in stdout
    weights = torch.load(run_dir / "final_weights.pt")
    assert all(torch.isfinite(v).all() for v in weights.values())
    attempts = Counter(json.loads(line)["step"] for line in (run_dir / "seen_rank0.jsonl").read_text().splitlines())
    assert attempts[4] == 2  # replayed after the rollback to step_00000004
    assert attempts[5] == attempts[6] == attempts[7] == 1  # the failed attempts only: skipped after the rollback
    assert attempts[12] == 1 and attempts[15] == 1  # the lone NaN at step 13 was skipped without a rollback


def test_zero2_starts_a_model_with_an_odd_parameter_count(odd_model_through_nan_steps):
    from tests.fixtures.engine import SmallNet

    assert sum(p.numel() for p in SmallNet(5).parameters()) % 2 == 1
    _, _, res = odd_model_through_nan_steps
    assert res["state"]["step"] == 16 and res["loss"] > 0
