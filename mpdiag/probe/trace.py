"""Post-mortem of one batch: the first operator that produced NaN or inf, in forward or backward.

``trace_nonfinite(model, loss_fn, batch)`` re-runs the batch with every operator's outputs checked
(a TorchDispatchMode; slow, one batch, after the fact) and returns the first operator whose output
holds NaN, +inf or -inf: its name, the module path it ran in (for a backward operator: the module of
the forward call that created it), the phase, and the Python stack of that forward call. Unlike
``torch.autograd.detect_anomaly`` it checks forward too, and Inf as well as NaN.

The model is left as found (parameters, ``.grad``, buffers, random state); an attached Diagnosis
records none of the re-run. Call it in the ``except`` of a training loop that just hit a NaN loss.

Examples:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> origin = trace_nonfinite(model, lambda m, x: m(x).log().sum(), torch.ones(1, 2))
    >>> origin is None or origin.op == "aten.log.default"
    True
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.hooks import RemovableHandle

from mpdiag.core.errors import MpdiagError
from mpdiag.core.events import NonFiniteOrigin, internal_frame
from mpdiag.probe._rerun import preserved
from mpdiag.record import MODULE_KEY, claim_nodes, floating_tensors

__all__ = ["trace_nonfinite"]


def trace_nonfinite(
    model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any
) -> NonFiniteOrigin | None:
    """Re-run forward and backward of one batch; the first operator producing NaN/inf, or None if clean.

    Args:
        model: the model, in the mode (train/eval) the failing step ran in.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss, forward included.
        batch: whatever ``loss_fn`` takes.

    Examples:
        >>> import torch, mpdiag
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> with torch.no_grad():
        ...     _ = torch.nn.init.eye_(model[0].weight), model[0].bias.zero_()
        >>> loss = lambda m, x: m(x).log().sum()  # the log is taken outside the model, of -1
        >>> origin = mpdiag.trace_nonfinite(model, loss, torch.tensor([[1.0, -1.0]]))
        >>> origin.op, origin.phase, origin.module
        ('aten.log.default', 'forward', None)
    """
    if not isinstance(model, nn.Module):
        raise MpdiagError(f"trace_nonfinite expects a torch.nn.Module, got {type(model).__name__}")
    watch = _FirstNonFinite()
    with preserved(model) as rerun:
        rerun(lambda: _run(model, loss_fn, batch, watch))
    return watch.found


def _run(
    model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any, watch: _FirstNonFinite
) -> None:
    with _module_tracking(model, watch), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
        # anomaly mode (without its NaN check) keeps each node's forward stack in node.metadata
        with torch.autograd.detect_anomaly(check_nan=False), watch:
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise MpdiagError(f"loss_fn must return a scalar loss tensor, got {type(loss).__name__}")
            watch.phase = "backward"
            if loss.requires_grad and watch.found is None:
                loss.backward()


class _FirstNonFinite(TorchDispatchMode):
    """Checks every operator's outputs; remembers the first that holds a non-finite value."""

    def __init__(self) -> None:
        super().__init__()
        self.found: NonFiniteOrigin | None = None
        self.phase = "forward"
        self.modules: list[str] = []  # forward module stack, innermost last

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.found is None:
            bad = [t for t in _floating(out) if not bool(torch.isfinite(t).all())]
            if bad:
                self.found = self._origin(func, bad, args, kwargs)
        return out

    def _origin(self, func: Any, bad: list[torch.Tensor], args: Any, kwargs: Any) -> NonFiniteOrigin:
        inputs_finite = all(bool(torch.isfinite(t).all()) for t in _floating((args, kwargs)))
        if self.phase == "forward":
            module = self.modules[-1] if self.modules else None
            stack = traceback.format_stack()
        else:
            node = torch._C._current_autograd_node()
            # torch declares Node.metadata an (abstract) method; the C++ nodes have it as a dict attribute
            metadata: dict[str, Any] = node.metadata if node is not None else {}  # type: ignore[assignment]
            module, stack = metadata.get(MODULE_KEY), list(metadata.get("traceback_", ()))
        return NonFiniteOrigin(
            op=str(func),
            module=module,
            phase=self.phase,
            stack=_user_frames(stack),
            nans=sum(int(torch.isnan(t).sum()) for t in bad),
            posinf=sum(int((t == float("inf")).sum()) for t in bad),
            neginf=sum(int((t == float("-inf")).sum()) for t in bad),
            inputs_finite=inputs_finite,
        )


def _user_frames(stack: list[str]) -> tuple[str, ...]:
    """The stack up to the last frame outside torch and mpdiag."""
    end = len(stack)
    while end and internal_frame(stack[end - 1]):
        end -= 1
    return tuple(stack[:end])


def _floating(tree: Any) -> Iterator[torch.Tensor]:
    return (t for t in floating_tensors(tree) if t.is_floating_point())


class _module_tracking:  # noqa: N801 - used as a context manager, like torch's own
    """Keeps the forward module stack and tags the autograd nodes each module's forward created."""

    def __init__(self, model: nn.Module, watch: _FirstNonFinite) -> None:
        self.model, self.watch = model, watch
        self.handles: list[RemovableHandle] = []

    def __enter__(self) -> None:
        for name, module in self.model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave(name)))

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self.watch.modules.append(name)

        return hook

    def _leave(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.watch.modules and self.watch.modules[-1] == name:
                self.watch.modules.pop()
            claim_nodes([t.grad_fn for t in _floating(output) if t.grad_fn is not None], name)

        return hook
