"""Suite-wide settings. Fixtures shared between areas live in tests/fixtures/<area>.py, registered below."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.images",
    "tests.fixtures.mlflow",
    "tests.fixtures.runs",
    "tests.fixtures.slurm",
    "tests.fixtures.teacher",
]
