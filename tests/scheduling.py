"""How ``make test``'s two pytest-xdist workers share the suite (``--dist loadgroup``): by work units, the
heaviest first. A plugin of its own (tests/conftest.py loads it) that imports nothing of the project, so
tests/test_scheduling.py runs it in a pytest session of its own at the cost of pytest alone."""
import pytest
from xdist.scheduler import LoadScopeScheduling

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
    tests/test_scheduling.py runs two modules under two workers and checks that each ran whole on one of them."""

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
            raise pytest.UsageError(f"{item.nodeid} is a SLURM test outside tests/scheduling.py SLURM_MODULES: add "
                                    "its module there")
        heavy = any(item.get_closest_marker(name) for name in HEAVY_MARKERS)
        weight[unit] = weight.get(unit, 0) + (10 if heavy else 1)
    items.sort(key=lambda item: -weight[work_unit(item.nodeid)])
