"""The package's public surface: one version, explicit ``__all__`` lists of public names that exist, and
every name documented before the package was layered still importable."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pkgutil
import warnings
from pathlib import Path

import pytest
import torch

import mpdiag

ROOT = Path(__file__).parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(mpdiag.__path__, "mpdiag.") if m.name != "mpdiag.__main__")


NAMESPACES = {"mpdiag.sinks"}


@pytest.mark.parametrize("name", MODULES)
def test_a_public_module_lists_its_own_public_names_and_they_exist(name):
    module = importlib.import_module(name)
    private = any(part.startswith("_") for part in name.split(".")[1:])
    # a layer's package, or a namespace of names built in the layers (mpdiag.sinks): its modules hold the names
    package = Path(module.__file__).name == "__init__.py" or name in NAMESPACES
    exported = getattr(module, "__all__", None)
    if exported is None:
        assert private or package, f"{name} is public but has no __all__"
        return
    assert [n for n in exported if not hasattr(module, n)] == []
    assert [n for n in exported if n.startswith("_") and n != "__version__"] == []
    if not package:  # a module exports what it defines, not what it imports
        borrowed = [
            n
            for n in exported
            if (inspect.isclass(obj := getattr(module, n)) or inspect.isfunction(obj)) and obj.__module__ != name
        ]
        assert borrowed == [], f"{name}'s __all__ lists names defined elsewhere"


def test_every_name_the_api_page_documents_resolves():
    documented = [
        line.split()[1] for line in (ROOT / "docs/reference/api.md").read_text().splitlines() if line.startswith("::: ")
    ]
    for path in documented:
        module, _, attr = path.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), path
    assert sorted(mpdiag.__all__) == sorted(set(mpdiag.__all__))
    assert all(hasattr(mpdiag, n) for n in mpdiag.__all__)


# What mpdiag 0.1's docs, README and notebooks told users to write, before the package was layered.
DOCUMENTED_BEFORE = [
    "mpdiag.formats.Format",
    "mpdiag.formats.get",
    "mpdiag.diagnose.diagnose",
    "mpdiag.anomaly.AnomalyRecord",
    "mpdiag.scaling.LossScaleAdvice",
    "mpdiag.scaling.ScaleOutcome",
    "mpdiag.scaling.underflow_per_step",
    "mpdiag.grad_scaler.GradScalerSimulation",
    "mpdiag.verdict.verdicts",
    "mpdiag.verdict.Verdict",
    "mpdiag.verdict.scaled_underflow",
    "mpdiag.terminal.summary",
    "mpdiag.environment.check_autocast",
    "mpdiag.render.figures",
    "mpdiag.cli.build_parser",
    "mpdiag.demo.run_demo",
]


@pytest.mark.parametrize("path", DOCUMENTED_BEFORE)
def test_names_documented_before_the_move_still_import(path):
    module, _, attr = path.rpartition(".")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(f"from {module} import {attr}", {})  # the import statement users wrote
        assert getattr(importlib.import_module(module), attr) is not None
    moved = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    if module in ("mpdiag.formats", "mpdiag.diagnose", "mpdiag.render", "mpdiag.cli", "mpdiag.demo"):
        assert moved == []  # still where they were
    else:
        assert moved and all(f"{module}.{attr} moved to mpdiag." in m for m in moved)


def test_an_old_module_path_names_where_a_missing_name_went():
    import mpdiag.scaling

    with pytest.raises(AttributeError, match=r"moved to mpdiag.analysis.scaling, mpdiag.analysis.gradients"):
        mpdiag.scaling.no_such_name  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'no_such_module'"):
        mpdiag.no_such_module  # noqa: B018


def test_tensor_stats_of_still_works_and_says_what_replaced_it():
    with pytest.warns(DeprecationWarning, match=r"mpdiag.tensor_stats\(x\) now"):
        old = mpdiag.TensorStats.of(torch.tensor([0.0, 7e4]), formats="fp16")
    assert old == mpdiag.tensor_stats(torch.tensor([0.0, 7e4]), formats="fp16") and old.overflow("fp16") == 1


def test_one_version_number():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "mpdiag.core.version.__version__"
    assert mpdiag.__version__ == importlib.import_module("mpdiag.core.version").__version__
    assert importlib.metadata.version("mpdiag") == mpdiag.__version__
