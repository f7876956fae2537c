"""The package's public surface: one version, explicit ``__all__`` lists of public names that exist."""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from pathlib import Path

import pytest
import tomllib

import mpdiag

MODULES = sorted(m.name for m in pkgutil.walk_packages(mpdiag.__path__, "mpdiag.") if m.name != "mpdiag.__main__")


@pytest.mark.parametrize("name", MODULES)
def test_a_public_module_lists_its_public_names_and_they_exist(name):
    module = importlib.import_module(name)
    private = any(part.startswith("_") for part in name.split(".")[1:])
    package = Path(module.__file__).name == "__init__.py"  # a layer's package: its modules hold the names
    exported = getattr(module, "__all__", None)
    if exported is None:
        assert private or package, f"{name} is public but has no __all__"
        return
    assert [n for n in exported if not hasattr(module, n)] == []
    assert [n for n in exported if n.startswith("_") and n != "__version__"] == []


def test_the_top_level_exports_every_documented_name():
    documented = [
        line.split()[1]
        for line in (Path(__file__).parents[1] / "docs/reference/api.md").read_text().splitlines()
        if line.startswith("::: ")
    ]
    for path in documented:
        module, _, attr = path.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), path
    assert sorted(mpdiag.__all__) == sorted(set(mpdiag.__all__))
    assert all(hasattr(mpdiag, n) for n in mpdiag.__all__)


def test_one_version_number():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "mpdiag.core.version.__version__"
    assert mpdiag.__version__ == importlib.import_module("mpdiag.core.version").__version__
    assert importlib.metadata.version("mpdiag") == mpdiag.__version__
