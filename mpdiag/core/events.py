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

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from mpdiag.core.errors import MpdiagError
from mpdiag.core.sites import Kind
from mpdiag.core.text import display_name

if TYPE_CHECKING:
    from mpdiag.core.stats import TensorStats

__all__ = ["NonFiniteEvent", "NonFiniteError", "NonFiniteOrigin", "AnomalyRecord", "PHASES", "order"]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # mpdiag/

#: The phase of training a non-finite value of each kind of site is seen in.
Phase = Literal["forward", "backward", "optimizer"]
PHASES: tuple[Phase, ...] = ("forward", "backward", "optimizer")
PHASE_OF_KIND: dict[Kind, Phase] = {
    Kind.ACTIVATION: "forward",
    Kind.PARAM: "forward",
    Kind.ACTIVATION_GRAD: "backward",
    Kind.PARAM_GRAD: "backward",
    Kind.OPTIMIZER_STATE: "optimizer",
    Kind.UPDATE: "optimizer",
}


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
    kind: Kind
    phase: Phase
    nans: int
    posinf: int
    neginf: int
    seq: int
    produced: bool
    ranks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind.parse(self.kind))  # from a run file or another rank: text
        if self.phase not in PHASES:
            raise MpdiagError(f"unknown phase {self.phase!r}; expected one of {', '.join(PHASES)}")

    def __str__(self) -> str:
        counts = ", ".join(
            f"{n} {label}" for n, label in ((self.nans, "NaN"), (self.posinf, "+inf"), (self.neginf, "-inf")) if n
        )
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

    def __init__(
        self,
        event: NonFiniteEvent,
        events: Sequence[NonFiniteEvent],
        history: Mapping[tuple[str, Kind], list[tuple[int, TensorStats]]],
    ) -> None:
        self.event = event
        self.events = tuple(events)
        self.history = dict(history)
        trail = history.get((event.name, event.kind), [])
        amax = ", ".join(f"step {s}: {st.amax:.3g}" for s, st in trail[-4:])
        super().__init__(
            f"non-finite values at {event}; {len(self.events)} site(s) affected in this step. "
            f"amax of {event.kind} of {display_name(event.name)} over the recorded steps before: {amax or 'none'}"
        )


def order(events: Sequence[NonFiniteEvent]) -> list[NonFiniteEvent]:
    """Forward before backward, then in execution order."""
    return sorted(events, key=lambda e: (e.step, PHASES.index(e.phase), e.seq))


@dataclass(frozen=True)
class NonFiniteOrigin:
    """The first operator that produced a non-finite value.

    Attributes:
        op: the ATen operator ("aten.log.default").
        module: module path it ran in ("" is the root; None: outside the model, in the loss function).
        phase: "forward" or "backward".
        stack: the Python stack of the forward call behind it (formatted frames, outermost first).
        nans, posinf, neginf: counts in its output.
        inputs_finite: False when its inputs already held non-finite values (the batch or a parameter
            did: the operator only passed them on).
    """

    op: str
    module: str | None
    phase: str
    stack: tuple[str, ...]
    nans: int
    posinf: int
    neginf: int
    inputs_finite: bool

    def __str__(self) -> str:
        where = "outside the model" if self.module is None else f"in module {display_name(self.module)}"
        counts = ", ".join(
            f"{n} {label}" for n, label in ((self.nans, "NaN"), (self.posinf, "+inf"), (self.neginf, "-inf")) if n
        )
        source = "" if self.inputs_finite else " (its inputs were already non-finite)"
        frames = "".join([f for f in self.stack if not internal_frame(f)][-3:]).rstrip()  # the user's own lines
        return f"{self.op} produced {counts} in {self.phase}, {where}{source}\n{frames}"


def internal_frame(frame: str) -> bool:
    """A frame inside torch or mpdiag: dispatch and module-call machinery, which says nothing to a user."""
    return any(root in frame for root in (os.path.dirname(torch.__file__), _PACKAGE_DIR))


@dataclass(frozen=True)
class AnomalyRecord:
    """What anomaly mode reported.

    Attributes:
        message: the RuntimeError's text ("Function 'LogBackward0' returned nan values in its 0th output."),
            or, when the error did not pass through the Diagnosis's with-block, the same sentence
            without the output index.
        traceback: the forward traceback torch emitted (formatted frames, outermost first).
        module: the module path whose forward created the failing operator (None: outside the model).
        node: the failing autograd node's name ("LogBackward0").
        step: the step in progress.
    """

    message: str
    traceback: tuple[str, ...]
    module: str | None
    node: str
    step: int
