"""tests/cpu_report.py: each test's CPU time, its child processes' included, in the report and the JUnit XML."""
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

from tests.fixtures.cli import REPO

WORK = '''
import subprocess, sys, time

def test_spins_in_a_child_process():
    subprocess.run([sys.executable, "-c", "sum(range(3 * 10 ** 7))"], check=True)

def test_sleeps():
    time.sleep(0.5)
'''


def test_a_tests_cpu_counts_its_child_processes_and_not_its_waiting(tmp_path):
    (tmp_path / "test_work.py").write_text(WORK)
    junit = tmp_path / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.cpu_report", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), f"--junitxml={junit}", str(tmp_path)], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    listed = {name: float(seconds) for seconds, name in
              re.findall(r"^\s*([\d.]+)s cpu  test_work\.py::(\w+)$", proc.stdout, re.MULTILINE)}
    assert listed.keys() == {"test_spins_in_a_child_process", "test_sleeps"}, proc.stdout[-3000:]
    assert listed["test_spins_in_a_child_process"] > 0.2 and listed["test_sleeps"] < 0.1, listed
    recorded = {case.get("name"): float(case.find("properties/property[@name='cpu_s']").get("value"))
                for case in ET.parse(junit).getroot().iter("testcase")}
    assert recorded.keys() == listed.keys()
    assert all(abs(recorded[name] - listed[name]) <= 0.005 for name in listed), (recorded, listed)  # printed to 0.01 s
