"""The suite's own scheduling (tests/scheduling.py): under ``make test``'s ``--dist loadgroup`` a module's tests run
in a row on one worker, so its module-scoped fixtures are built once."""
import os
import re
import subprocess
import sys

import pytest

from tests.fixtures.cli import REPO
from tests.scheduling import work_unit

TESTS_OF_A_MODULE = "".join(f"def test_{i}():\n    pass\n\n\n" for i in range(6))


@pytest.mark.dist  # a pytest session with two workers
def test_a_module_runs_whole_on_one_of_two_workers(tmp_path):
    """Two modules of six tests each, under two workers and the scheduling plugin alone (no conftest: the
    session costs pytest's start-up, not the project's imports); xdist's own loadgroup spreads them over both."""
    for name in ("test_first.py", "test_second.py"):
        (tmp_path / name).write_text(TESTS_OF_A_MODULE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.scheduling", "--noconftest", "-p",
                           "no:cacheprovider", "-n", "2", "--dist", "loadgroup", "--no-loadscope-reorder", "-v",
                           "test_first.py", "test_second.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    workers: dict[str, set[str]] = {}
    for worker, module in re.findall(r"^\[(gw\d)\] .*PASSED (\w+\.py)::", proc.stdout, re.M):
        workers.setdefault(module, set()).add(worker)
    assert sorted(workers) == ["test_first.py", "test_second.py"], proc.stdout[-3000:]
    assert all(len(ran_on) == 1 for ran_on in workers.values()), workers


def test_the_slurm_modules_are_one_unit_and_any_other_module_its_own():
    assert work_unit("tests/test_slurm.py::test_x") == work_unit("tests/test_distributed.py::test_y[a]") == "slurm"
    assert work_unit("tests/test_knn.py::test_z[1-2]") == "tests/test_knn.py"
