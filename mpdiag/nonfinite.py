"""Where NaN and inf first appeared: events in execution order, found with the step's one host read.

Every observation inside a step gets a sequence number in the order hooks ran (forward hooks fire as
modules finish, innermost first; gradient hooks in backward order). Its NaN/+inf/-inf counts are three
buckets of its statistics, kept on the device; when the step closes they are read together with
everything else and turned into ``NonFiniteEvent`` records. The first event of a phase is where
mpdiag first saw a non-finite value in that phase (``produced``); later ones received it from upstream.

NB: parameters are observed when the step closes but sort first in the forward phase (seq -1): a
non-finite parameter is where a forward NaN starts. A batch that itself holds NaN shows up as produced
by the first module that consumes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mpdiag._text import display_name
from mpdiag.errors import MpdiagError

__all__ = ["NonFiniteEvent", "NonFiniteError", "PHASES"]

PHASES = ("forward", "backward")
_PHASE_OF_KIND = {"activation": "forward", "param": "forward", "activation_grad": "backward",
                  "param_grad": "backward"}


@dataclass(frozen=True)
class NonFiniteEvent:
    """One observation that held NaN or inf.

    Attributes:
        step, name, kind: where (``name`` is the module or parameter name; the root module is "").
        phase: "forward" or "backward".
        nans, posinf, neginf: how many of each the observed tensor held.
        seq: order of the observation within its step (-1: parameters, observed before the forward).
        produced: True for the first event of its phase in the step (the origin as far as mpdiag saw);
            False for sites that received non-finite values from upstream.
        ranks: under torch.distributed, the ranks whose tensors held them (counts are summed over
            those ranks); empty in a single process.
    """

    step: int
    name: str
    kind: str
    phase: str
    nans: int
    posinf: int
    neginf: int
    seq: int
    produced: bool
    ranks: tuple[int, ...] = ()

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {label}" for n, label in ((self.nans, "NaN"), (self.posinf, "+inf"),
                                                            (self.neginf, "-inf")) if n)
        role = "first seen here" if self.produced else "received from upstream"
        where = f", rank{'s' if len(self.ranks) > 1 else ''} {', '.join(map(str, self.ranks))}" if self.ranks else ""
        return f"step {self.step}, {self.phase}: {counts} in {self.kind} of {display_name(self.name)} ({role}{where})"


class NonFiniteError(MpdiagError):
    """A step produced NaN or inf (``diagnose(on_nonfinite="raise")``).

    Attributes:
        event: the origin, the first event of the step (forward before backward).
        events: every event of the step, in order.
        history: for each site involved, (step, TensorStats) of the last recorded steps up to this one:
            what the values looked like before they broke.
    """

    def __init__(self, event: NonFiniteEvent, events: Sequence[NonFiniteEvent],
                 history: Mapping[tuple[str, str], list[tuple[int, Any]]]) -> None:
        self.event = event
        self.events = tuple(events)
        self.history = dict(history)
        trail = history.get((event.name, event.kind), [])
        amax = ", ".join(f"step {s}: {st.amax:.3g}" for s, st in trail[-4:])
        super().__init__(
            f"non-finite values at {event}; {len(self.events)} site(s) affected in this step. "
            f"amax of {event.kind} of {display_name(event.name)} over the recorded steps before: {amax or 'none'}")


def order(events: Sequence[NonFiniteEvent]) -> list[NonFiniteEvent]:
    """Forward before backward, then in execution order."""
    return sorted(events, key=lambda e: (e.step, PHASES.index(e.phase), e.seq))


class EventLog:
    """Recording side: the non-finite counts of every observation of the current step, by sequence."""

    def __init__(self) -> None:
        self._host: list[tuple[int, str, str, tuple[int, int, int]]] = []
        self._device: list[tuple[int, str, str, torch.Tensor]] = []

    def note(self, seq: int, name: str, kind: str, counts: Any, nonfinite_buckets: tuple[int, int, int]) -> None:
        """Remember the (nan, posinf, neginf) buckets of one observation's counts (numpy or device)."""
        if isinstance(counts, np.ndarray):
            values = tuple(int(counts[b]) for b in nonfinite_buckets)
            if any(values):
                self._host.append((seq, name, kind, values))  # type: ignore[arg-type]
        else:  # slices: indexing with a list would copy the index to the device first
            self._device.append((seq, name, kind, torch.cat([counts[b:b + 1] for b in nonfinite_buckets])))

    def device_tensors(self) -> list[torch.Tensor]:
        return [t for *_, t in self._device]

    def events(self, step: int, device_values: Sequence[np.ndarray]) -> list[NonFiniteEvent]:
        """The step's events, given the host values of ``device_tensors()`` (read at the step close)."""
        raw = list(self._host) + [(seq, name, kind, tuple(int(v) for v in values))
                                  for (seq, name, kind, _), values in zip(self._device, device_values)
                                  if np.any(values)]
        raw.sort(key=lambda r: (PHASES.index(_PHASE_OF_KIND[r[2]]), r[0]))
        firsts: set[str] = set()
        events = []
        for seq, name, kind, (nans, posinf, neginf) in raw:
            phase = _PHASE_OF_KIND[kind]
            events.append(NonFiniteEvent(step, name, kind, phase, nans, posinf, neginf, seq, phase not in firsts))
            firsts.add(phase)
        return events

    def clear(self) -> None:
        self._host.clear()
        self._device.clear()
