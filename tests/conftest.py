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
# The venv's tools first, as in an activated shell and under make: an op built by another ninja would be rebuilt.
if not os.environ.get("PATH", "").startswith(str(Path(sys.prefix) / "bin") + os.pathsep):
    os.environ["PATH"] = str(Path(sys.prefix) / "bin") + os.pathsep + os.environ.get("PATH", "")

pytest_plugins = [
    "tests.scheduling",
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
