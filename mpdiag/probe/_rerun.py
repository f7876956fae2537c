"""Re-running one batch on a model without leaving a trace: used by replay_loss_scale and trace_nonfinite."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from mpdiag.record import paused


@contextlib.contextmanager
def preserved(
    model: nn.Module, start_from: dict[str, Any] | None = None
) -> Iterator[Callable[[Callable[[], Any]], Any]]:
    """Yield ``rerun(fn)``: runs fn from the same RNG state with .grad cleared; restore everything after.

    ``start_from``: the RNG state (``rng_state()``) each run starts from, when not the current one (a
    later run that must draw what an earlier one drew); the current state is restored at the end.
    """
    grads = {p: p.grad for p in model.parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    rng = rng_state()
    start = start_from if start_from is not None else rng

    def rerun(fn: Callable[[], Any]) -> Any:
        set_rng_state(start)
        for p in model.parameters():
            p.grad = None
        try:
            return fn()
        finally:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])

    try:
        with paused(model):
            yield rerun
    finally:
        for p, g in grads.items():
            p.grad = g
        set_rng_state(rng)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
