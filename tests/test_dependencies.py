"""Every third-party package our code imports is declared in pyproject.toml, not borrowed from another's deps."""

from __future__ import annotations

import ast
import sys
import tomllib

from tests.conftest import ROOT

# Import name → distribution name, where they differ.
DISTRIBUTIONS = {"google": "google-auth", "yaml": "pyyaml", "prometheus_client": "prometheus-client"}
OURS = {"canary", "probes", "exporter", "tests"}


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = set()
    for requirement in project["dependencies"]:
        name = requirement.split(";")[0]
        for stop in "<>=[ ~!":
            name = name.split(stop)[0]
        names.add(name.strip().lower())
    return names


def _imported() -> set[str]:
    found: set[str] = set()
    for package in ("canary", "probes", "exporter"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name not in OURS}


def test_every_imported_package_is_a_declared_dependency() -> None:
    missing = {DISTRIBUTIONS.get(name, name).lower() for name in _imported()} - _declared()
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
