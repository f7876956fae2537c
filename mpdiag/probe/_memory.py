"""Peak memory of one training step, measured: the CUDA allocator's own peak, or on a CPU the profiler's
record of every allocation and free.

Both devices measure the same quantity: the bytes of the training state live when the step starts
(parameters, buffers, optimizer state; gradients were just cleared) plus the highest the step's own
allocations rise above that (activations saved for backward, gradients, temporaries, autocast's
low-precision weight copies, the optimizer's scratch). What else the process holds (the batch, other
models, the CUDA context, the caching allocator's reserve) is not counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mpdiag.core.errors import MpdiagError

__all__ = ["StepMemory", "state_bytes", "METHODS"]

#: What each device's figure is read from, as the comparison's summary says it.
METHODS = {
    "cuda": "the CUDA caching allocator's peak of allocated bytes (torch.cuda.max_memory_allocated)",
    "cpu": "torch.profiler's record of every CPU allocation and free (profile_memory=True)",
}


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the parameters, buffers, gradients and optimizer state tensors, each storage once."""
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for state in optimizer.state.values() for t in _tensors(state)]
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr(), t.device] = storage.nbytes()
    return sum(storages.values())


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


class StepMemory:
    """Measures the peak of steps on one device: ``with memory.measuring(step, model, optimizer): ...``,
    then ``memory.keep(True)`` to count that step (False: a step that does not count, one a GradScaler
    skipped, say). ``memory.peak`` is the highest of the steps kept (0 before any), ``memory.steps`` them.

    On CUDA this resets the allocator's peak statistics (``torch.cuda.reset_peak_memory_stats``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.steps: list[int] = []
        self._last: tuple[int, int] | None = None

    @contextlib.contextmanager
    def measuring(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        at_start = state_bytes(model, optimizer)
        measure = self._cuda if self.device.type == "cuda" else self._cpu
        rise: list[int] = []
        with measure(rise):
            yield
        self._last = (step, at_start + rise[0])

    def keep(self, counts: bool) -> None:
        """Count the step just measured, or not."""
        if counts and self._last is not None:
            self.steps.append(self._last[0])
            self.peak = max(self.peak, self._last[1])
        self._last = None

    @contextlib.contextmanager
    def _cuda(self, rise: list[int]) -> Iterator[None]:
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        torch.cuda.synchronize(self.device)
        rise.append(max(0, torch.cuda.max_memory_allocated(self.device) - before))

    @contextlib.contextmanager
    def _cpu(self, rise: list[int]) -> Iterator[None]:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield
        rise.append(_highest_rise(prof))


def _highest_rise(prof: Any) -> int:
    """The highest the running total of the profiled CPU allocations rose above where it started.

    Frees of blocks allocated before the profiler started are not in its record (torch says so in a
    warning): they could only lower the total, so the figure errs high, never low."""
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:
        raise MpdiagError(
            "this torch's profiler keeps no memory events (prof.profiler.kineto_results), so CPU peak "
            "memory cannot be measured; compare on a CUDA device, or upgrade torch"
        )
    events = [e for e in results.events() if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    running = highest = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        highest = max(highest, running)
    return highest
