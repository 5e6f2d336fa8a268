"""The package's layers only import downwards (docs/architecture.md): read off every module's import statements."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "itpn_ds"
# Lowest first; a module may import its own layer and the ones before it. ``__init__`` is the package itself
# (its version, and the registration of the models with timm).
LAYERS = (
    {"errors", "distributed"},
    {"data"},
    {"teacher"},
    {"models", "tracking"},
    {"engine", "config"},
    {"__init__", "scaling", "demo", "cli", "torchrun"},
)


def layer_of(unit: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if unit in units)


def unit_of(module: Path) -> str:
    """``data`` for itpn_ds/data/x.py, ``cli`` for itpn_ds/cli.py."""
    parts = module.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else module.stem


def imported_units(module: Path) -> set[str]:
    """The package's units that ``module`` imports, at its top or inside a function."""
    units = set()
    for node in ast.walk(ast.parse(module.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "itpn_ds" else [f"itpn_ds.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name == "itpn_ds" or name.startswith("itpn_ds."):
                first = name.split(".")[1] if "." in name else "__init__"
                units.add("__init__" if first == "__version__" else first)
    return units


def test_every_import_of_the_package_looks_down_its_layers():
    upward = []
    for module in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of(module)
        for target in imported_units(module) - {unit}:
            if target != "__init__" and layer_of(target) > layer_of(unit):
                upward.append(f"{module.relative_to(PACKAGE.parent)} ({unit}) imports {target}")
    assert not upward, "\n".join(upward)


def test_every_unit_of_the_package_has_a_layer():
    units = {unit_of(module) for module in PACKAGE.rglob("*.py")}
    assert units <= set().union(*LAYERS), units - set().union(*LAYERS)
