"""The suite's own scheduling (tests/conftest.py): under ``make test``'s ``--dist loadgroup`` a module's tests run
in a row on one worker, so its module-scoped fixtures are built once."""
import re
import subprocess
import sys

import pytest

from tests.conftest import work_unit
from tests.fixtures.cli import REPO


@pytest.mark.dist  # a pytest session with two workers
def test_a_module_runs_whole_on_one_of_two_workers():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "--no-loadscope-reorder",
                           "-v", "tests/test_knn.py", "tests/test_masking.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    workers: dict[str, set[str]] = {}
    for worker, module in re.findall(r"^\[(gw\d)\] .*PASSED (tests/\w+\.py)::", proc.stdout, re.M):
        workers.setdefault(module, set()).add(worker)
    assert sorted(workers) == ["tests/test_knn.py", "tests/test_masking.py"], proc.stdout[-3000:]
    assert all(len(ran_on) == 1 for ran_on in workers.values()), workers


def test_the_slurm_modules_are_one_unit_and_any_other_module_its_own():
    assert work_unit("tests/test_slurm.py::test_x") == work_unit("tests/test_distributed.py::test_y[a]") == "slurm"
    assert work_unit("tests/test_knn.py::test_z[1-2]") == "tests/test_knn.py"
