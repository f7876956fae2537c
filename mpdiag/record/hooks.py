"""The recording side: hook bodies that feed device-side accumulators, and nothing else.

Hooks never format text, never read device values on the host and never change what they observe:
they pass detached tensors to ``SiteAccumulator.observe`` and return None. A forward hook registers a
tensor hook on each output that requires grad, which is how the gradient arriving at a module's output
is seen without wrapping the output (``register_full_backward_hook`` would, and that breaks in-place
ops that follow the module).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from mpdiag.core.events import NonFiniteEvent
from mpdiag.core.run import Kind, Site
from mpdiag.core.stats import TensorStats
from mpdiag.core.text import display_name
from mpdiag.core.updates import UpdateStats
from mpdiag.record import distributed
from mpdiag.record._accumulate import SKIP_REASONS, Observation, SiteAccumulator, measure, read_with_extras, skip_reason
from mpdiag.record._dynamo import inlined_only, untraced
from mpdiag.record._updates import count_update, decode, second_moments, stall_formats
from mpdiag.record.anomaly import AnomalyWatch
from mpdiag.record.environment import autocast_dtype
from mpdiag.record.event_log import EventLog

__all__ = ["Recorder", "in_backward", "floating_tensors"]

log = logging.getLogger(__name__)

_MAX_NESTING = 32  # outputs nest a few levels at most; the cap guards against self-referencing objects
_RECENT = 4  # measurements remembered for reuse; the same tensor reaches nested modules back to back


_is_compiling = getattr(torch.compiler, "is_compiling", None) or (lambda: torch._dynamo.is_compiling())  # torch < 2.3


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread now."""
    return torch._C._current_graph_task_id() != -1


def floating_tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every floating (or complex) tensor in a module output: tensors, sequences, mappings, dataclasses."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield obj
        return
    if depth >= _MAX_NESTING or isinstance(obj, (str, bytes)):
        return
    if isinstance(obj, (list, tuple)):  # namedtuples are tuples
        items: Any = obj
    elif isinstance(obj, Mapping):
        items = obj.values()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = (getattr(obj, f.name) for f in dataclasses.fields(obj))
    else:
        return
    for item in items:
        yield from floating_tensors(item, depth + 1)


class Recorder:
    """Owns the accumulators of one diagnosis and the bodies of its hooks."""

    def __init__(
        self,
        format_names: tuple[str, ...],
        params: Mapping[str, nn.Parameter],
        group: Any = None,
        replicated: set[Site] | None = None,
    ) -> None:
        self.format_names = format_names
        self.params = dict(params)
        self._param_names = {id(p): name for name, p in self.params.items()}  # the optimizer's state is keyed by tensor
        self.group = group  # torch.distributed: statistics are reduced across it when a step closes
        self.replicated = replicated or set()  # sites every rank holds whole: not summed
        self.recording = True
        self.evaluating = False  # the model's forward runs with autograd off (evaluation, generate()): not training
        self.trained = False  # a backward pass was seen, ever: from then on, forwards without autograd are evaluation
        self.in_model_forward = False  # a training forward of the whole model is running
        self.active = False  # a hook observed something since the last reset
        self.saw_backward = False  # a gradient arrived since the last reset (recorded or not)
        self.on_first_backward: Callable[[], None] | None = None  # called once per step, at its first gradient
        self._accumulators: dict[Site, SiteAccumulator] = {}
        self._warned: set[tuple[Site, str]] = set()
        self._recent: list[tuple[weakref.ref[torch.Tensor], int, Observation]] = []
        self.events = EventLog()  # non-finite counts of each observation, in execution order
        self.anomaly: AnomalyWatch | None = None  # set by the Diagnosis: tags autograd nodes in anomaly mode
        self.device_type = "cpu"  # set by the Diagnosis: where autocast is looked up
        self.autocast_dtype: str | None = None  # the autocast dtype seen in a recorded forward
        self.params_seen = False  # observe_params() ran in this step
        self.weights_before: dict[str, torch.Tensor] = {}  # copies taken as the optimizer's step began
        # per parameter: (its dtype's name, the formats its stalled updates are counted for, the counts
        # of count_update, on its device), for the step's one read
        self.update_counts: dict[str, tuple[str, tuple[Any, ...], torch.Tensor]] = {}
        self._seq = 0

    def accumulator(self, site: Site) -> SiteAccumulator:
        acc = self._accumulators.get(site)
        if acc is None:
            acc = self._accumulators[site] = SiteAccumulator(self.format_names)
        return acc

    def _observe(self, site: Site, tensor: torch.Tensor, seq: int | None = None) -> None:
        reason = skip_reason(tensor)
        if reason is not None:
            if (site, reason) not in self._warned:
                self._warned.add((site, reason))
                log.info(
                    "mpdiag: not recording a tensor at %s (%s): %s",
                    display_name(site.name),
                    site.kind,
                    SKIP_REASONS[reason],
                )
            return
        obs = self._measure_once(tensor)
        self.accumulator(site).add(obs)
        if seq is None:
            seq, self._seq = self._seq, self._seq + 1
        if obs.nonfinite != 0:  # unknown (on a device) or some: keep the NaN/inf counts for the close
            self.events.note(seq, site.name, site.kind, obs.part.counts, obs.part.layout.nonfinite_buckets)

    def _measure_once(self, tensor: torch.Tensor) -> Observation:
        """Measure ``tensor``, or reuse the measurement of the very same, unmodified tensor.

        Nested modules often return the same tensor object (a Sequential returns its last child's
        output; the root returns the head's logits) and their gradient hooks then get the same gradient.
        """
        if tensor.is_inference():  # no version counter to tell whether it changed in place since
            return measure(tensor, self.format_names)
        for ref, version, obs in self._recent:
            if ref() is tensor and tensor._version == version:
                return obs
        obs = measure(tensor, self.format_names)
        self._recent = [(weakref.ref(tensor), tensor._version, obs), *self._recent[: _RECENT - 1]]
        return obs

    # -- hook bodies ------------------------------------------------------------------------------
    @inlined_only
    def on_forward(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        # The one part torch.compile traces: a flag read. Dynamo guards on it, so the steps ``every=``
        # leaves unrecorded compile into graphs without the breaks that the untraced body costs (one is
        # left, where the model's forward begins and the step boundary is checked). (Anomaly
        # mode's per-module tags are for eager autograd nodes; asking for it breaks a graph.)
        if (self.recording and not self.evaluating) or (not _is_compiling() and torch.is_anomaly_enabled()):
            self._on_forward(name, output)

    @untraced
    def _on_forward(self, name: str, output: Any) -> None:
        if self.anomaly is not None and torch.is_anomaly_enabled():
            self.anomaly.tag(name, [t.grad_fn for t in floating_tensors(output) if t.grad_fn is not None])
        if not self.recording or self.evaluating:
            return
        if self.trained and not self.in_model_forward and not torch.is_grad_enabled() and not in_backward():
            return  # a part of the model run on its own without autograd (generate()'s encoder): evaluation
        # A forward that runs inside backward is activation checkpointing recomputing what the first
        # forward already produced (and this hook already counted): counting it again would double the
        # checkpointed modules. Its outputs still get gradient hooks: under reentrant checkpointing the
        # first forward ran without grad, and the recomputed outputs are the ones backward reaches.
        recomputing = in_backward()
        if not recomputing:
            self.active = True
            if self.autocast_dtype is None:  # seen inside forward: autocast may be applied in forward itself
                self.autocast_dtype = autocast_dtype(self.device_type)
        site = Site(name, Kind.ACTIVATION)
        for tensor in floating_tensors(output):
            # A 0-dim output is a loss (or a loss term) the model returns: not a layer's activation, and the
            # gradient that reaches it is the weight the objective gives it (1, 1/N, the loss scale), the
            # seed of backward. Left out, the statistics are the same whether the loss is computed inside
            # the model or outside it.
            if tensor.dim() == 0:
                continue
            if not recomputing:
                self._observe(site, tensor)
            if tensor.requires_grad:
                tensor.register_hook(functools.partial(self.on_activation_grad, name))

    def _backward_seen(self) -> None:
        self.trained = True
        if not self.saw_backward:
            self.saw_backward = True
            if self.on_first_backward is not None:
                self.on_first_backward()

    @untraced
    def on_activation_grad(self, name: str, grad: torch.Tensor) -> None:
        self._backward_seen()
        if self.recording and grad is not None:
            self.active = True
            self._observe(Site(name, Kind.ACTIVATION_GRAD), grad)

    @untraced
    def on_param_grad(self, name: str, param: torch.Tensor) -> None:
        # Fires after each backward has accumulated into .grad; keep only the latest, so gradient
        # accumulation over micro-batches records the gradient the optimizer will see.
        self._backward_seen()
        if self.recording and param.grad is not None:
            self.active = True
            site = Site(name, Kind.PARAM_GRAD)
            self.accumulator(site).reset()
            self._observe(site, param.grad)

    # -- closing a step ---------------------------------------------------------------------------
    def observe_params(self) -> None:
        """Observe the parameters now, while they are what the step's forward uses; once per step."""
        if self.params_seen or not self.recording:
            return
        self.params_seen = True
        self.active = True
        for name, param in self.params.items():
            self._observe(Site(name, Kind.PARAM), param, seq=-1)  # what the forward used: before all else

    def copy_weights(self, optimizer: torch.optim.Optimizer) -> None:
        """Copy every observed parameter that ``optimizer`` steps, as its step begins, on recorded steps
        only: its update is the value after the step minus this (memory: one copy of them until the step
        closes). A parameter another optimizer steps is not this one's to judge."""
        if self.recording and not self.weights_before:
            stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self.weights_before = {
                n: p.detach().clone() for n, p in self.params.items() if p.requires_grad and id(p) in stepped
            }

    def observe_updates(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Observe each parameter's update, after the optimizer's step: new minus old, computed in fp64
        (exact unless the weight changed by more than 2^29 times itself); and count, per parameter, what
        the step changed and what narrower formats would lose (``mpdiag.core.updates``), with the share
        where Adam's eps dominates when ``optimizer`` is of the Adam family. A parameter whose group has
        a learning rate of 0 was not meant to change: what it "lost" is not counted."""
        if not self.recording:
            return
        moments = {id(p): m for p, m in second_moments(optimizer)} if optimizer is not None else {}
        frozen: set[int] = set()
        for group in optimizer.param_groups if optimizer is not None else ():
            lr = group.get("lr")
            if isinstance(lr, (int, float)) and lr == 0:  # a tensor lr is not read: that would sync the host
                frozen.update(id(p) for p in group["params"])
        for name, before in self.weights_before.items():
            self.active = True
            param = self.params[name]
            site = Site(name, Kind.UPDATE)
            if Site(name, Kind.PARAM) in self.replicated:  # DDP: every rank's update is the whole, alike
                self.replicated.add(site)
            update = param.detach().double().sub_(before)  # before promoted inside the kernel: one fp64 copy
            self._observe(site, update)
            stall = stall_formats(param.dtype, self.format_names)
            grad = param.grad if id(param) not in frozen else None
            counts = count_update(before, update, grad, stall, moments.get(id(param)))
            self.update_counts[name] = (str(param.dtype).replace("torch.", ""), stall, counts)
        self.weights_before = {}

    def observe_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Observe, after ``optimizer``'s step, every floating tensor of its state for each observed
        parameter (Adam's ``exp_avg``, ``exp_avg_sq``; SGD's ``momentum_buffer``; whatever an optimizer
        keeps), as the site ``<parameter>.<key>``. 0-dim state (Adam's ``step`` count) is no tensor of
        values. Read where it lives, with no host sync, as every other site."""
        if not self.recording:
            return
        for param, state in optimizer.state.items():
            name = self._param_names.get(id(param))
            if name is None or not isinstance(state, Mapping):
                continue  # a parameter outside include=/exclude=, or state an optimizer keeps its own way
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0:
                    self.active = True
                    site = Site(f"{name}.{key}", Kind.OPTIMIZER_STATE)
                    if Site(name, Kind.PARAM) in self.replicated:  # DDP: every rank's state is the whole, alike
                        self.replicated.add(site)
                    self._observe(site, value)

    def collect(self, step: int) -> tuple[dict[Site, TensorStats], list[NonFiniteEvent], dict[str, UpdateStats]]:
        """Observe parameters (and gradients no hook saw), then read everything with one host transfer
        per device: the statistics of every site, the non-finite events and the updates of the step."""
        self.observe_params()
        for name, param in self.params.items():
            grad_site = Site(name, Kind.PARAM_GRAD)
            if param.grad is not None and self.accumulator(grad_site).empty:
                self._observe(grad_site, param.grad)  # set by hand, not by backward
        live = {site: acc for site, acc in self._accumulators.items() if not acc.empty}
        counts = {name: vector for name, (_, _, vector) in self.update_counts.items()}
        if self.group is not None:
            live = distributed.reduce_accumulators(live, self.accumulator, self.group, self.replicated)
            counts = distributed.reduce_update_counts(counts, self.group, self.replicated)
        event_tensors = self.events.device_tensors()
        stats, extras = read_with_extras(live, [*event_tensors, *counts.values()])
        events = self.events.events(step, extras[: len(event_tensors)])
        if self.group is not None:
            events = distributed.gather_events(events, self.group, self.replicated)
        updates = {
            name: decode(name, *self.update_counts[name][:2], host)
            for name, host in zip(counts, extras[len(event_tensors) :])
            if name in self.update_counts  # (a parameter only other ranks updated has no dtype known here)
        }
        return stats, events, updates

    # What a re-run's forward and backward would change: mpdiag's own probes are not training.
    _PAUSE_KEEPS = ("recording", "active", "saw_backward", "trained", "evaluating", "in_model_forward")

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside, nothing is recorded; afterwards the state of the step in progress is as it was."""
        saved = {name: getattr(self, name) for name in self._PAUSE_KEEPS}
        self.recording = False
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    def reset(self) -> None:
        self._recent.clear()
        self.events.clear()
        self._seq = 0
        for acc in self._accumulators.values():
            acc.reset()
        self.active = False
        self.saw_backward = False
        self.params_seen = False
        self.weights_before = {}  # a step() that raised never used them
        self.update_counts = {}
