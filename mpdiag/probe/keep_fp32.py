"""Run chosen modules in fp32 inside autocast: what practitioners do by hand for layers that overflow fp16.

``keep_fp32(model, names)`` is a context manager. Inside it, each named module runs with autocast
disabled and its floating inputs cast to fp32, so its parameters (fp32 master weights under autocast)
and its arithmetic stay in fp32. Its output is fp32; the next module under autocast casts it as it
casts anything else. On exit the modules are as they were. transformers users get the same effect at
load time with a model class's ``_keep_in_fp32_modules`` (``transformers_line`` writes the line).

Examples:
    >>> import torch, mpdiag
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    >>> with torch.autocast("cpu", dtype=torch.bfloat16), mpdiag.keep_fp32(model, ["1"]):
    ...     model[0](torch.ones(1, 4)).dtype, model(torch.ones(1, 4)).dtype
    (torch.bfloat16, torch.float32)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map_only

from mpdiag.core.errors import MpdiagError
from mpdiag.core.text import display_name

__all__ = ["keep_fp32", "transformers_line"]

#: Where the wrapper is kept on a module while it runs in fp32 (and how a second keep_fp32 sees it).
_WRAPPED = "_mpdiag_fp32_forward"


@contextlib.contextmanager
def keep_fp32(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Run the modules of ``model`` named ``names`` (as ``model.named_modules()`` names them) in fp32
    under autocast while the context is open.

    Raises:
        MpdiagError: a name that is not a module of ``model``; a module whose floating parameters are
            not fp32 (pure low-precision weights: there is no fp32 copy to compute with).
    """
    if not isinstance(model, nn.Module):
        raise MpdiagError(f"keep_fp32 expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(names, str):
        raise MpdiagError(f"keep_fp32 expects a list of module names, not one string: use [{names!r}]")
    if names is None:
        raise MpdiagError(
            "keep_fp32 got names=None: the search found no set of modules that works in low precision "
            "(KeepFp32.names is None); train this model in fp32, or search again with a larger tolerance"
        )
    model = eager_module(model)
    names = list(names)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise MpdiagError(
            f"keep_fp32: {', '.join(repr(n) for n in missing)} not a module of {type(model).__name__}; "
            "names are as model.named_modules() gives them (for example 'encoder.block.0.layer.1.wo')"
        )
    for name in names:
        low = sorted({str(p.dtype) for p in modules[name].parameters() if p.is_floating_point()} - {"torch.float32"})
        if low:
            raise MpdiagError(
                f"keep_fp32: module {display_name(name)!r} has {', '.join(low)} parameters; it can run in fp32 "
                "only with fp32 weights (autocast training), so convert it first with .float()"
            )
    wrapped = [modules[n] for n in dict.fromkeys(names) if not hasattr(modules[n], _WRAPPED)]
    for module in wrapped:
        _wrap(module)
    try:
        yield
    finally:
        for module in wrapped:
            _unwrap(module)


def eager_module(model: nn.Module) -> nn.Module:
    """The module behind ``torch.compile(model)`` (an OptimizedModule), whose names ``sensitivity``
    reports and ``keep_fp32`` takes; any other module as it is."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule" else model


def _wrap(module: nn.Module) -> None:
    # The instance attribute takes precedence over the class's forward; a forward that was already an
    # instance attribute (accelerate and others patch it so) is kept to be restored.
    own = module.__dict__.get("forward")
    inner: Callable[..., Any] = own if own is not None else module.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            for device_type in _device_types(module, args, kwargs):
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return inner(*_to_fp32(args), **_to_fp32(kwargs))

    setattr(module, _WRAPPED, own)
    module.forward = forward


def _unwrap(module: nn.Module) -> None:
    own = module.__dict__.pop(_WRAPPED)
    del module.forward
    if own is not None:
        module.forward = own


def _device_types(module: nn.Module, args: Any, kwargs: Any) -> list[str]:
    """Every device type whose autocast to turn off: the parameters' and the inputs' (a CPU side
    tensor passed to a CUDA module must not leave CUDA's autocast on), the CPU's when there are none."""
    types = {p.device.type for p in module.parameters()}
    types |= {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
    return sorted(types) or ["cpu"]


def _to_fp32(tree: Any) -> Any:
    """``tree`` with its low-precision floating tensors cast to fp32 (fp64 and integer tensors as they are)."""
    return tree_map_only(torch.Tensor, _widened, tree)


def _widened(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() and t.dtype.itemsize < 4 else t


def transformers_line(model: nn.Module, names: Iterable[str], dtype: torch.dtype = torch.float16) -> str | None:
    """The class attribute that makes transformers load ``names`` in fp32 when ``model``'s class is loaded
    in ``dtype``, or None for a model that is not a transformers ``PreTrainedModel``.

    ``_keep_in_fp32_modules`` applies to fp16 loading only, ``_keep_in_fp32_modules_strict`` to fp16 and
    bf16. transformers searches each entry in the parameter names (as a pattern), so the full module
    paths used here select exactly those modules' parameters. It sets the weights' dtype at load time;
    whether the module's forward then computes in fp32 is up to the model's code (T5's does), which is
    what ``keep_fp32`` does for any model.
    """
    if not _is_transformers_model(model):
        return None
    attribute = "_keep_in_fp32_modules_strict" if dtype == torch.bfloat16 else "_keep_in_fp32_modules"
    target = f"{type(model).__name__}.{attribute}"
    entries = ", ".join(repr(n) for n in dict.fromkeys(names))
    return f"{target} = [*({target} or []), {entries}]"  # added to the class's own entries (T5 has some)


def _is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing transformers)."""
    classes = type(model).__mro__
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in classes)
