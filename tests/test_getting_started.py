"""docs/getting_started_cluster.md as a tested script: every command of its shell blocks and its Python block
run in order at tiny size, in this process, so the guide cannot drift from the CLI.

An ``sbatch ... launch/slurm/X.sbatch ARGS`` line runs as the subcommand that script starts, with the same
ARGS; the recipes, paths and sizes of the guide are swapped for tiny ones (``TINY``), and a few size
overrides are appended (``SMALLER``). A command this test does not know fails it. The guide's pre-training
uses a shipped recipe with no tracking keys: it must land in the store ``MLFLOW_TRACKING_URI`` names."""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.fixtures.cli import REPO, itpn_ds_in_process

GUIDE = REPO / "docs" / "getting_started_cluster.md"
SBATCH_COMMANDS = {"pretrain.sbatch": "pretrain", "finetune.sbatch": "finetune",
                   "extract_teacher.sbatch": "extract-teacher"}
# Appended to the guide's arguments (a later flag or key=value wins): tiny sizes for the CPU.
SMALLER = {"make-shards": ["--workers", "1", "--quiet"],
           "extract-teacher": ["--num-views", "2", "--batch-size", "16", "--no-progress"],
           "pretrain": ["model.kwargs.teacher_dim=32", "data.micro_batch=4", "schedule.max_steps=2"],
           "finetune": ["schedule.epochs=1"]}


def guide_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), re.DOTALL)


def shell_commands() -> list[list[str]]:
    """The guide's shell commands in order: continuation lines joined, comments dropped, split as the shell does."""
    text = "\n".join(guide_blocks("bash")).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if shlex.split(line, comments=True)]


def tiny(word: str, table: dict[str, str]) -> str:
    for big, small in table.items():
        word = word.replace(big, small)
    return word


def as_itpn_ds(argv: list[str]) -> list[str] | None:
    """``itpn-ds CMD ARGS`` or ``sbatch OPTIONS launch/slurm/X.sbatch ARGS`` as ``[CMD, *ARGS]``; None otherwise."""
    if argv[0] == "itpn-ds":
        return argv[1:]
    if argv[0] == "sbatch":
        script = next(a for a in argv if a.endswith(".sbatch"))
        assert (REPO / script).is_file(), f"the guide submits {script}, which does not exist"
        return [SBATCH_COMMANDS[Path(script).name], *argv[argv.index(script) + 1:]]
    return None


def test_the_cluster_guide_runs_at_tiny_size(demo_image_folder, tiny_clip_checkpoint, tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    table = {"/data/imagenet/train": str(demo_image_folder), "/data/imagenet/val": str(demo_image_folder),
             "/data/clip/ViT-L-14.pt": str(tiny_clip_checkpoint), "/data/": f"{tmp_path}/data/",
             "/runs/": f"{tmp_path}/runs/", "/models/": f"{tmp_path}/models/",
             "http://mlflow.internal:5000": store, "itpn_large_clip_l_pretrain": "tiny_pretrain_cpu",
             "itpn_large_finetune": "tiny_finetune_cpu"}
    logs: dict[str, str] = {}
    for argv in shell_commands():
        argv = [tiny(word, table) for word in argv]
        command = as_itpn_ds(argv)
        if command is not None:
            logs[command[0]] = itpn_ds_in_process(*command, *SMALLER.get(command[0], []))
        elif argv[:2] == ["git", "clone"] or argv[:2] == ["export", "PATH=$PWD/.venv/bin:$PATH"]:
            continue  # the install: this checkout and its venv
        elif argv[0] == "export":
            name, value = argv[1].split("=", 1)
            monkeypatch.setenv(name, value)
        elif argv[:2] == ["cp", "-r"]:
            shutil.copytree(argv[2], argv[3])
        else:
            pytest.fail(f"the guide runs {shlex.join(argv)!r}, which this test does not know: teach it")
    assert set(logs) == {"make-shards", "verify-shards", "plan-cache", "extract-teacher", "pretrain", "finetune",
                         "evaluate"}, sorted(logs)
    (python,) = guide_blocks("python")
    exec(tiny(python, table), {})  # loads the kept model in timm

    first = next(line for line in logs["pretrain"].splitlines() if "itpn_ds.engine:" in line)
    assert f"tracking: MLflow run 'itpn_l_pt' of experiment 'itpn-ds' at {store}" in first, first
    assert "batch: global batch 8 = 8 per rank x 1 ranks x 1 accumulation steps" in logs["finetune"]
    client = MlflowClient(store)
    runs = {run.info.run_name: run for run in client.search_runs(
        [client.get_experiment_by_name("itpn-ds").experiment_id])}
    assert {"itpn_l_pt", "itpn_l_ft", "evaluate best"} <= set(runs), sorted(runs)
    assert [m.step for m in client.get_metric_history(runs["itpn_l_pt"].info.run_id, "train/loss")] == [1, 2]
    assert runs["evaluate best"].data.metrics["eval/top1"] == pytest.approx(
        float(re.search(r"top1 ([0-9.]+)", logs["evaluate"]).group(1)), abs=1e-3)
