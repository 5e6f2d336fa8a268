"""The package as pip installs it (a wheel, not the editable checkout): every module, the recipes and the
DeepSpeed JSONs are inside, and the installed copy finds them."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, directory the wheel is installed into with ``pip install --target``)."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(root), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = root.glob("itpn_ds-*.whl")
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return wheel, target


def test_wheel_holds_every_module_recipe_and_deepspeed_config(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(REPO)) for package in ("itpn_ds", "data_tools") for p in (REPO / package).rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    for pattern, folder in (("*.json", "ds_configs"), ("*.yaml", "itpn_ds/recipes")):
        shipped = {f"itpn_ds/{folder.removeprefix('itpn_ds/')}/{p.name}" for p in (REPO / folder).glob(pattern)}
        assert shipped and shipped <= names, sorted(shipped - names)


def test_installed_package_finds_its_recipes_and_deepspeed_configs(installed, tmp_path):
    _, target = installed
    probe = ("import itpn_ds.engine.ds_config as d\n"
             "from itpn_ds.config import load_config\n"
             "cfg = load_config('tiny_pretrain_cpu', [])\n"
             "print(d.__file__)\n"
             "print(d.ds_config_path(cfg.deepspeed.config))\n"
             "print(d.load_ds_json('zero3')['zero_optimization']['stage'])\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    module, config, stage = proc.stdout.split()
    assert module.startswith(str(target)) and config.startswith(str(target)), proc.stdout
    assert stage == "3"


@pytest.mark.parametrize("argv, code, stream", [(["plan-cache", "--images", "1000"], 0, "stdout"),
                                                (["plan-cache", "--nodes", "0"], 2, "stderr")])
def test_installed_console_script_exits_with_the_commands_code(installed, tmp_path, argv, code, stream):
    """``itpn-ds`` as pip installs it (``itpn_ds.cli:run``): the command's output and exit code, a user error in one
    line."""
    _, target = installed
    proc = subprocess.run([str(target / "bin" / "itpn-ds"), *argv], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert getattr(proc, stream).strip(), proc
    if code:
        assert proc.stderr.startswith("itpn-ds plan-cache: ") and len(proc.stderr.splitlines()) == 1, proc.stderr
