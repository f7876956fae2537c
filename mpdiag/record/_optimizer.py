"""Finding the torch optimizer behind a wrapper, and what a call to its ``step`` says about the step.

Training libraries hand users wrapped optimizers: accelerate's ``AcceleratedOptimizer`` (a subclass of
``torch.optim.Optimizer`` that never ran its ``__init__``, so it has none of the hook tables), Lightning's
``LightningOptimizer``, the HF Trainer's (accelerate's). Each exposes the real optimizer as
``.optimizer``; accelerate's also carries the GradScaler it steps through as ``.scaler``.
"""

from __future__ import annotations

from typing import Any

import torch

from mpdiag.core.errors import AttachError

__all__ = ["closure_of", "is_grad_scaler", "unwrap_optimizer"]

_MAX_WRAPPERS = 8  # wrappers nest a level or two; the cap guards against a wrapper that holds itself


def unwrap_optimizer(optimizer: Any) -> tuple[torch.optim.Optimizer, Any]:
    """(the torch optimizer whose step hooks fire, the GradScaler a wrapper steps it through or None)."""
    scaler, current = None, optimizer
    for _ in range(_MAX_WRAPPERS):
        if scaler is None and is_grad_scaler(getattr(current, "scaler", None)):
            scaler = current.scaler
        if isinstance(current, torch.optim.Optimizer) and _has_step_hooks(current):
            return current, scaler
        inner = getattr(current, "optimizer", None)
        if inner is None or inner is current:
            break
        current = inner
    raise AttachError(
        f"optimizer must be a torch.optim.Optimizer, or a wrapper that exposes one as .optimizer "
        f"(accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer); got "
        f"{type(optimizer).__name__}"
    )


def closure_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The closure passed to ``optimizer.step(closure)``, or None, from a step hook's arguments (torch
    passes the step's own arguments, the optimizer first)."""
    if len(args) > 1:
        return args[1]
    return kwargs.get("closure")


def _has_step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    # Optimizer.__init__ creates the tables; a subclass that skipped it (accelerate's wrapper) has none.
    return "_optimizer_step_pre_hooks" in vars(optimizer)


def is_grad_scaler(obj: Any) -> bool:
    """A torch GradScaler (``torch.amp`` or ``torch.cuda.amp``) or one that behaves like it."""
    return callable(getattr(obj, "get_scale", None)) and hasattr(obj, "is_enabled")
