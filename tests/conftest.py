"""Suite-wide settings. Fixtures shared between areas live in tests/fixtures/<area>.py, registered below."""
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.images",
    "tests.fixtures.mlflow",
    "tests.fixtures.runs",
    "tests.fixtures.slurm",
    "tests.fixtures.teacher",
]

RENDEZVOUS_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_leaked_process_group():
    """A command run in the test process joins a process group of one and exports the rendezvous variables
    (``itpn_ds.distributed.export``); after every test the group is left and the variables are put back as
    they were, so no later test inherits either (a subprocess under srun or torchrun, or its own group)."""
    import torch.distributed as dist

    saved = {name: os.environ.get(name) for name in RENDEZVOUS_ENV}
    had_group = dist.is_available() and dist.is_initialized()
    yield
    if not had_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
