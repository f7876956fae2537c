"""How mpdiag's hooks meet torch.compile: which run eagerly between graphs, which dynamo traces.

- ``untraced``: a hook body dynamo must not trace. It does Python bookkeeping and (on CPU) calls a numba
  kernel, which dynamo would otherwise trace into (and fail in numba's dispatcher). It runs eagerly, at
  a graph break, which ``torch.compile(..., fullgraph=True)`` refuses with a reason that says what to do.
- ``inlined_only``: a hook's light part (a flag read), which dynamo traces with the model, so that it
  costs nothing in the compiled graph, but never compiles as a frame of its own: where the graph breaks
  at an untraced body, dynamo would otherwise compile the hook's frame once per module (it specialises
  on each), hit its recompile limit and warn about it.

Both only mark the function; ``prepare`` applies the marks when the first Diagnosis attaches, because
importing torch._dynamo costs about a second, which ``import mpdiag`` and the CLI should not pay.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["untraced", "inlined_only", "prepare", "skip_own_frames"]

_MARK = "_mpdiag_dynamo"
_REASON = (
    "mpdiag's hooks record tensors eagerly, between compiled graphs; compile without fullgraph=True "
    "while mpdiag.diagnose() is attached"
)


def untraced(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a method to run eagerly, out of dynamo's tracing (see the module docstring)."""
    setattr(fn, _MARK, "untraced")
    return fn


def inlined_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a method that dynamo may trace inline but never compile as a frame of its own."""
    setattr(fn, _MARK, "inlined")
    return fn


def prepare(*classes: type) -> None:
    """Apply the marks on the methods of ``classes``; once per class (later calls do nothing)."""
    for cls in classes:
        _prepare(cls)


@functools.cache
def _prepare(cls: type) -> None:
    for name, fn in list(vars(cls).items()):
        mark = getattr(fn, _MARK, None)
        if mark == "untraced":
            setattr(cls, name, _disabled(fn))
        elif mark == "inlined":
            skip_own_frames(fn)


def skip_own_frames(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Never compile ``fn``'s code as a frame of its own (dynamo still traces it inline)."""
    import torch._dynamo

    skip_code = getattr(torch._dynamo.eval_frame, "skip_code", None)  # private: absent, only the warning is lost
    if skip_code is not None:
        skip_code(fn.__code__)
    return fn


def _disabled(fn: Callable[..., Any]) -> Callable[..., Any]:
    try:
        return torch.compiler.disable(fn, reason=_REASON)
    except TypeError:  # torch < 2.6 takes no reason
        return torch.compiler.disable(fn)
