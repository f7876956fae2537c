"""The module paths of mpdiag 0.1's flat layout, still importable (``from mpdiag.verdict import verdicts``,
``mpdiag.scaling.LossScaleAdvice``) with a DeprecationWarning that names where each name lives now.

Each old module is a stand-in that looks its names up in the modules that hold them after the move
(``mpdiag.scaling`` in ``analysis.scaling`` and ``analysis.gradients``, say).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import Any

__all__ = ["MOVED", "install"]

#: old module -> the modules its names live in now, in lookup order.
MOVED: dict[str, tuple[str, ...]] = {
    "mpdiag.casting": ("mpdiag.core.casting",),
    "mpdiag.stats": ("mpdiag.core.stats", "mpdiag.record._accumulate"),
    "mpdiag.run": ("mpdiag.core.run",),
    "mpdiag.errors": ("mpdiag.core.errors",),
    "mpdiag.nonfinite": ("mpdiag.core.events", "mpdiag.record.event_log"),
    "mpdiag.anomaly": ("mpdiag.core.events", "mpdiag.record.anomaly"),
    "mpdiag.hooks": ("mpdiag.record.hooks",),
    "mpdiag.distributed": ("mpdiag.record.distributed",),
    "mpdiag.environment": ("mpdiag.record.environment",),
    "mpdiag.scaling": ("mpdiag.analysis.scaling", "mpdiag.analysis.gradients"),
    "mpdiag.grad_scaler": ("mpdiag.analysis.grad_scaler",),
    "mpdiag.verdict": ("mpdiag.analysis.verdict",),
    "mpdiag.summary": ("mpdiag.analysis.riskiest",),
    "mpdiag.replay": ("mpdiag.probe.replay",),
    "mpdiag.trace": ("mpdiag.probe.trace", "mpdiag.core.events"),
    "mpdiag.runfile": ("mpdiag.io.runfile",),
    "mpdiag.terminal": ("mpdiag.render.terminal",),
}


class _MovedModule(types.ModuleType):
    """Stands in for an old module: each name is found where it lives now, with a warning saying where."""

    def __init__(self, name: str, targets: tuple[str, ...]) -> None:
        super().__init__(name, f"moved: see {', '.join(targets)}")
        self._targets = targets

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                warnings.warn(
                    f"{self.__name__}.{attr} moved to {target}.{attr}; import it from there (or from "
                    f"mpdiag itself where it is exported)",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self._targets)}) has no {attr!r}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _MovedModule(spec.name, MOVED[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install() -> None:
    """Make the old paths importable (once per process). ``mpdiag.formats`` is still public (the package
    exports it), so it is an alias, without a warning."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
    sys.modules.setdefault("mpdiag.formats", importlib.import_module("mpdiag.core.formats"))
    from mpdiag.core.stats import DEFAULT_FORMATS, FormatSpecs, TensorStats
    from mpdiag.record._accumulate import tensor_stats

    def of(cls: type[TensorStats], tensor: Any, formats: FormatSpecs = DEFAULT_FORMATS) -> TensorStats:
        """Deprecated: ``mpdiag.tensor_stats(tensor, formats)``."""
        warnings.warn("TensorStats.of(x) is mpdiag.tensor_stats(x) now", DeprecationWarning, stacklevel=2)
        return tensor_stats(tensor, formats)

    if not hasattr(TensorStats, "of"):
        setattr(TensorStats, "of", classmethod(of))  # noqa: B010 - a class attribute added at run time


def moved_module(name: str) -> types.ModuleType | None:
    """``mpdiag.<name>`` as an attribute of the package: the stand-in of an old module, or None."""
    full = f"mpdiag.{name}"
    return importlib.import_module(full) if full in MOVED else None
