"""The observers the overhead benchmarks set beside diagnose(): the amax floor, and what each reads per step."""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

import mpdiag

_MAX_NESTING = 8  # module outputs nest a level or two; the cap guards against self-referencing objects


def floating_outputs(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every floating tensor in a module output: in tuples, lists, mappings (a transformers ModelOutput
    is one) and dataclasses, as mpdiag looks for them; the same walk, so that the floor reads as much."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
    elif depth >= _MAX_NESTING or isinstance(obj, (str, bytes)):
        return
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from floating_outputs(item, depth + 1)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from floating_outputs(item, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from floating_outputs(getattr(obj, field.name), depth + 1)


@contextlib.contextmanager
def amax_hooks(model: nn.Module, params: bool = False) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """One abs().amax() per floating output tensor and per gradient of one, kept on the device (no host
    sync); yields the lists the amaxes of outputs and of gradients go to. Like mpdiag, it leaves out 0-dim
    outputs (a loss the model returns) and reads a tensor that a parent module returns again unchanged only
    once (a Sequential's output is its last child's): a floor that read GPT-2's logits twice is no floor.

    With ``params``, it also reads what mpdiag reads beside them: each parameter once per forward of the
    whole model (mpdiag reads them at the optimizer step) and each parameter's gradient once accumulated;
    their amaxes go to the same lists."""
    outputs: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    last: list[tuple[weakref.ref[torch.Tensor], int]] = []  # the tensor read last, and its version then

    def forward_hook(module: nn.Module, args: object, out: object) -> None:
        for x in floating_outputs(out):
            if x.dim() == 0 or (last and last[0][0]() is x and last[0][1] == x._version):
                continue
            last[:] = [(weakref.ref(x), x._version)]  # weak: holding the logits would keep them past the step
            outputs.append(x.detach().abs().amax())
            if x.requires_grad:
                x.register_hook(lambda g: grads.append(g.abs().amax()) and None)

    def read_params(module: nn.Module, args: object) -> None:
        outputs.extend(p.detach().abs().amax() for p in model.parameters())

    def read_grad(p: torch.Tensor) -> None:
        if p.grad is not None:
            grads.append(p.grad.abs().amax())

    handles = [m.register_forward_hook(forward_hook) for m in model.modules()]
    if params:
        handles.append(model.register_forward_pre_hook(read_params))
        handles.extend(p.register_post_accumulate_grad_hook(read_grad) for p in model.parameters() if p.requires_grad)
    try:
        yield outputs, grads
    finally:
        for h in handles:
            h.remove()


def floor_variants(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Callable[[], contextlib.AbstractContextManager[object]]]:
    """The variants both overhead benchmarks time: a plain step, mpdiag recording every step and one in
    ten, mpdiag every step without the optimizer's state and updates, and the two amax floors (outputs
    only, and with parameters and their gradients)."""
    return {
        "plain": contextlib.nullcontext,
        "mpdiag every=1": lambda: mpdiag.diagnose(model, every=1, optimizer=optimizer),
        "mpdiag no optim": lambda: mpdiag.diagnose(
            model, every=1, optimizer=optimizer, optimizer_state=False, updates=False
        ),
        "mpdiag every=10": lambda: mpdiag.diagnose(model, every=10, optimizer=optimizer),
        "amax hooks": lambda: amax_hooks(model),
        "amax +params": lambda: amax_hooks(model, params=True),
    }


def observed_per_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[], None]) -> str:
    """What each observer reads in one training step: mpdiag's sites by kind, the amax observers' tensors.
    Runs three steps of training (one with each)."""
    with mpdiag.diagnose(model, every=1, optimizer=optimizer) as diag:
        step()  # the optimizer's step closes the recorded step
    run = diag.run
    sites = list(run.records[run.steps[-1]])
    kinds = ", ".join(f"{sum(s.kind == kind for s in sites)} {kind.value}" for kind in mpdiag.Kind)
    with amax_hooks(model) as (outputs, grads):
        step()
    with amax_hooks(model, params=True) as (with_params, their_grads):
        step()
    return (
        f"mpdiag records {len(sites)} sites per step ({kinds}); "
        f"amax hooks read {len(outputs)} outputs and {len(grads)} gradients per step, "
        f"+params {len(with_params)} and {len(their_grads)}"
    )
