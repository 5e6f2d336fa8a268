"""The CPU time of each test, its processes' included, listed beside pytest's durations.

The suite is CPU-bound on its 2-core machines, and a test's duration depends on what the other xdist worker runs
meanwhile; its CPU time does not. Where a test runs, each phase (setup, call, teardown) adds the CPU seconds of
the test process and of the child processes it waited for (torchrun and its ranks, the CLI runs; not SLURM
jobs, which slurmd runs) to the item's ``user_properties`` as ``cpu_s``. The reports carry it to the controller
(and into a JUnit XML), which lists the ``CPU_REPORT_COUNT`` costliest tests at the end of the run. A module
fixture's cost falls on the first test that asks for it, as in the durations.
"""
from __future__ import annotations

import resource

import pytest

CPU_PROPERTY = "cpu_s"
CPU_REPORT_COUNT = 20
_totals: dict[str, float] = {}  # nodeid -> CPU seconds, on the controller (or the one process of a plain run)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its waited-for children (their descendants included)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def add_cpu(item: pytest.Item, seconds: float) -> None:
    so_far = dict(item.user_properties).get(CPU_PROPERTY, 0.0)
    item.user_properties[:] = [(k, v) for k, v in item.user_properties if k != CPU_PROPERTY]
    item.user_properties.append((CPU_PROPERTY, round(so_far + seconds, 3)))


def measured_phase(item: pytest.Item):
    """The body of a phase's hook wrapper: the phase runs at the ``yield``; its CPU time is added after it."""
    start = cpu_seconds()
    try:
        return (yield)
    finally:
        add_cpu(item, cpu_seconds() - start)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    return (yield from measured_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    return (yield from measured_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    return (yield from measured_phase(item))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """The teardown report holds the test's whole CPU time (every phase has added its own by then)."""
    if report.when == "teardown" and (seconds := dict(report.user_properties).get(CPU_PROPERTY)) is not None:
        _totals[report.nodeid] = seconds


def pytest_terminal_summary(terminalreporter) -> None:
    if not _totals:
        return
    terminalreporter.write_sep("=", f"most CPU {CPU_REPORT_COUNT} (the tests' processes included; "
                                    f"{sum(_totals.values()):.0f} s for all {len(_totals)} tests)")
    for nodeid, seconds in sorted(_totals.items(), key=lambda kv: -kv[1])[:CPU_REPORT_COUNT]:
        terminalreporter.write_line(f"{seconds:8.2f}s cpu  {nodeid}")
