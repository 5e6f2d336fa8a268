"""Suite-wide settings. Fixtures shared between areas live in tests/fixtures/<area>.py, registered below."""
import os
import sys
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

from tests.fixtures.cli import rendezvous_env_kept

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# As the Makefile sets them: DeepSpeed's JIT ops (built when the venv is made) and Inductor's caches live in the
# venv, so a pytest started by hand finds them too and no test builds an op or recompiles a kernel it has had.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(sys.prefix) / "inductor_cache"))
# The venv's tools first, as in an activated shell and under make: an op built by another ninja would be rebuilt.
if not os.environ.get("PATH", "").startswith(str(Path(sys.prefix) / "bin") + os.pathsep):
    os.environ["PATH"] = str(Path(sys.prefix) / "bin") + os.pathsep + os.environ.get("PATH", "")

pytest_plugins = [
    "tests.cpu_report",
    "tests.fixtures.images",
    "tests.fixtures.mlflow",
    "tests.fixtures.runs",
    "tests.fixtures.slurm",
    "tests.fixtures.teacher",
]


@pytest.fixture(autouse=True)
def no_leaked_rendezvous_env():
    """A command run in the test process exports the rendezvous variables (``itpn_ds.distributed.export``);
    they are put back as they were after every test, so no later subprocess (srun, torchrun) inherits them.
    Its process group of one stays (DeepSpeed caches its groups for the process): tests that need a group
    of their own check ``dist.is_initialized()`` first."""
    with rendezvous_env_kept():
        yield


@pytest.fixture(scope="session", autouse=True)
def mlflow_store_of_the_session(tmp_path_factory) -> str:
    """Tracking is on by default: a run that does not turn it off logs into this session's own sqlite store
    (``MLFLOW_TRACKING_URI``, inherited by the processes the tests start), never the user's store or server."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow_store') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
    return uri


# Markers of the tests whose cost is processes, a cluster, a server or compilation (seconds, not milliseconds).
HEAVY_MARKERS = ("slurm", "dist", "compile", "mlflow_server", "chain")
# The modules holding SLURM tests: one work unit, on one worker (they share the one local cluster).
SLURM_MODULES = ("tests/test_distributed.py", "tests/test_slurm.py", "tests/test_slurm_training.py")


def work_unit(nodeid: str) -> str:
    """The unit of tests one worker runs in a row (``make test``'s ``--dist loadgroup``): a module, whose tests
    share its module-scoped fixtures, or every SLURM module together."""
    module = nodeid.split("::", 1)[0]
    return "slurm" if module in SLURM_MODULES else module


class WorkUnitScheduling(LoadScopeScheduling):
    """pytest-xdist's scope scheduling over ``work_unit``s: each goes whole to one worker, in collection order.

    xdist's own ``loadgroup`` reads ``xdist_group`` marks through an item attribute pytest 9 no longer uses
    (``_nodeid``), so under it every test was its own unit: a module's tests went to both workers, each
    building the module's fixtures, and two workers could share the SLURM cluster.
    tests/test_conftest.py runs a module under two workers and checks that one of them ran it all."""

    def _split_scope(self, nodeid: str) -> str:
        return work_unit(nodeid)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log) -> LoadScopeScheduling | None:
    return WorkUnitScheduling(config, log) if config.getvalue("dist") == "loadgroup" else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Puts the heaviest work units first (a test carrying a marker of ``HEAVY_MARKERS`` weighs 10, any other
    1), so that the workers of ``make test`` finish close together; refuses a SLURM test outside
    ``SLURM_MODULES`` (it would not share the cluster's worker)."""
    weight: dict[str, int] = {}
    for item in items:
        unit = work_unit(item.nodeid)
        if item.get_closest_marker("slurm") and unit != "slurm":
            raise pytest.UsageError(f"{item.nodeid} is a SLURM test outside tests/conftest.py SLURM_MODULES: add "
                                    "its module there")
        heavy = any(item.get_closest_marker(name) for name in HEAVY_MARKERS)
        weight[unit] = weight.get(unit, 0) + (10 if heavy else 1)
    items.sort(key=lambda item: -weight[work_unit(item.nodeid)])
