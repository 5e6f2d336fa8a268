"""Suite-wide settings. Fixtures shared between areas live in tests/fixtures/<area>.py, registered below."""
import os
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import rendezvous_env_kept

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# As the Makefile sets them: DeepSpeed's JIT ops (built when the venv is made) and Inductor's caches live in the
# venv, so a pytest started by hand finds them too and no test builds an op or recompiles a kernel it has had.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(sys.prefix) / "inductor_cache"))

pytest_plugins = [
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
HEAVY_MARKERS = ("slurm", "dist", "compile", "mlflow_server")


def work_unit(item: pytest.Item) -> str:
    """The tests pytest-xdist keeps on one worker (``--dist loadgroup``): a module's tests (they share its
    module-scoped fixtures), and every SLURM test (they share the one local cluster)."""
    return "slurm" if item.get_closest_marker("slurm") else item.module.__name__


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups the tests into work units and puts the heaviest units first (a test carrying a marker of
    ``HEAVY_MARKERS`` weighs 10, any other 1), so that the workers of ``make test`` finish close together."""
    weight: dict[str, int] = {}
    for item in items:
        unit = work_unit(item)
        item.add_marker(pytest.mark.xdist_group(unit))
        heavy = any(item.get_closest_marker(name) for name in HEAVY_MARKERS)
        weight[unit] = weight.get(unit, 0) + (10 if heavy else 1)
    items.sort(key=lambda item: -weight[work_unit(item)])
