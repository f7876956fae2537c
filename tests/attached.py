"""Whether mpdiag left anything on a model: for the tests that training which ends, or raises, detaches."""

from __future__ import annotations

from torch import nn


def no_hooks_left(model: nn.Module) -> bool:
    """No forward hook on any module and no gradient hook on any parameter (mpdiag's, or anyone's)."""
    modules = all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    return modules and all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
