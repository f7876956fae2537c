"""Where numba keeps the compiled CPU kernel: a per-user cache directory, never the installed package.

numba's ``cache=True`` writes its ``*.nbi``/``*.nbc`` files into ``__pycache__`` beside the source. Inside
an installed package those are files no installer knows about: ``pip install -e`` over a regular install
then leaves ``site-packages/mpdiag/`` holding only them, a namespace package that hides the editable
checkout from every directory but the checkout itself. Compiling costs seconds in a fresh process (on a
2-core machine 1.3 s for fp32 tensors, 0.7 s for each other width, 1.9 s for each threaded variant), so
the kernels are still cached, in ``cache_dir()``: ``$MPDIAG_CACHE_DIR/numba/<mpdiag version>``, where
``MPDIAG_CACHE_DIR`` defaults to the user's cache directory for mpdiag (``$XDG_CACHE_HOME/mpdiag`` or
``~/.cache/mpdiag`` on Linux). A directory that cannot be created or written means no cache, not an error.

The locator is given to mpdiag's kernels only (``cached``): numba's configuration, and so where the user's
own numba functions cache, is left as it is.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from numba.core.caching import (
    CompileResultCacheImpl,
    FunctionCache,
    _CacheLocator,
    _SourceFileBackedLocatorMixin,
)
from numba.core.dispatcher import Dispatcher
from numba.misc.appdirs import user_cache_dir

from mpdiag.core.version import __version__

__all__ = ["CACHE_DIR_ENV", "cache_dir", "cached"]

log = logging.getLogger(__name__)

#: Environment variable naming the directory mpdiag caches into (read when the kernels are defined, at import).
CACHE_DIR_ENV = "MPDIAG_CACHE_DIR"


def cache_dir() -> Path:
    """The directory the compiled kernels of this mpdiag version are cached in."""
    root = os.environ.get(CACHE_DIR_ENV) or user_cache_dir("mpdiag", appauthor=False)
    return Path(root) / "numba" / __version__


class _UserCacheLocator(_SourceFileBackedLocatorMixin, _CacheLocator):
    """numba's cache locator for mpdiag's kernels; stale entries are told apart by numba's hash of the
    source file, as with its own locators."""

    def __init__(self, py_func: Any, py_file: str, directory: Path) -> None:
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._directory = str(directory)

    def get_cache_path(self) -> str:
        return self._directory


class _CacheImpl(CompileResultCacheImpl):
    def __init__(self, py_func: Any) -> None:
        # NB: numba's own __init__ takes its locators from NUMBA_CACHE_LOCATOR_CLASSES when that is set,
        # which may name the in-tree one; this sets the same three attributes with mpdiag's locator.
        source = inspect.getfile(py_func)
        self._lineno = py_func.__code__.co_firstlineno
        self._locator = _UserCacheLocator(py_func, source, cache_dir())
        self._filename_base = self.get_filename_base(
            f"{Path(source).stem}.{py_func.__qualname__}", getattr(sys, "abiflags", "")
        )


class _KernelCache(FunctionCache):
    _impl_class = _CacheImpl


def cached(dispatcher: Any) -> Any:
    """``dispatcher`` (a ``numba.njit`` function, not yet compiled) with its compiled code cached in
    ``cache_dir()``; left uncached where that directory cannot be used."""
    if not isinstance(dispatcher, Dispatcher):  # NUMBA_DISABLE_JIT=1: a plain Python function
        return dispatcher
    try:
        cache = _KernelCache(dispatcher.py_func)
        Path(cache.cache_path).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=cache.cache_path).close()  # writable, or numba's saves would fail later
    except Exception as err:  # noqa: BLE001 - a cache is an optimisation: whatever fails, compile instead
        log.debug("mpdiag: compiled kernels are not cached (%s: %s)", type(err).__name__, err)
        return dispatcher
    # NB: numba has no public way to give one function its own cache; enable_caching() (what cache=True
    # calls) sets this same attribute to a FunctionCache with numba's locators.
    dispatcher._cache = cache  # type: ignore[attr-defined]
    return dispatcher
