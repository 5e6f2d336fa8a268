"""Task families (itpn_ds/engine/tasks/): every task of the configuration has one, and each reads its
own config section and shard kind."""
import subprocess
import sys

import pytest

from itpn_ds.config import TASKS, load_config
from itpn_ds.engine.tasks import FAMILIES, task_family

RECIPES = {"pretrain": "tiny_pretrain_cpu", "finetune": "tiny_finetune_cpu", "segment": "tiny_segment_cpu",
           "detect": "tiny_detect_cpu"}


def test_every_task_has_a_family():
    assert set(FAMILIES) == set(TASKS) == set(RECIPES)


@pytest.mark.parametrize("task", TASKS)
def test_a_family_starts_from_and_evaluates_by_its_own_section(task):
    overrides = [f"task={task}"]
    if task != "pretrain":
        overrides += [f"{task}.init=/runs/pt", f"{task}.eval_every_epochs=7"]
    family = task_family(load_config(RECIPES[task], overrides))
    if task == "pretrain":
        assert (family.init_source, family.best_metric, family.shard_kind) == ("", "", None)
    else:
        assert (family.init_source, family.eval_every_epochs) == ("/runs/pt", 7)
        assert family.best_metric and family.shard_kind


@pytest.mark.parametrize("module", ["itpn_ds.engine.tasks.segment", "itpn_ds.config"])
def test_the_task_modules_and_the_config_that_composes_their_sections_import_first(module):
    """``config`` imports the task sections, so no task module may import ``config`` while it loads: each of these,
    imported first in a fresh interpreter, loads the whole registry."""
    code = f"import {module}; from itpn_ds.engine.tasks import task_names; print(','.join(task_names()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [",".join(TASKS)]
