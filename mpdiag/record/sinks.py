"""Sinks: where each recorded step goes as it closes, besides the Run kept in memory.

A sink is opened when the recording attaches (after the model was claimed, so that a refused attach
creates nothing), receives every closed step and every anomaly record, and is closed when the
recording detaches; ``discard`` undoes ``open`` when the attach fails half-way. Under torch.distributed
only rank 0 has sinks: the statistics a step closes with are already the whole job's.

A sink may also define ``write_updates(step, updates)``: when the step recorded what the optimizer did
to each parameter (``mpdiag.core.updates.UpdateStats``, by parameter name), it is called just before
that step's ``write_step``. It is optional so that a sink written before updates existed still is one.

The run file (``mpdiag.io.runfile.RunFileSink``) and TensorBoard (``mpdiag.integrations.tensorboard``)
are sinks; the recording imports none of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from mpdiag.core.events import AnomalyRecord, NonFiniteEvent
from mpdiag.core.run import Site
from mpdiag.core.stats import TensorStats

__all__ = ["Sink"]


@runtime_checkable
class Sink(Protocol):
    """Receives a recording's steps as they close. See the module docstring for the order of calls."""

    def open(self, formats: tuple[str, ...], meta: Mapping[str, Any]) -> None:
        """The recording attached: ``formats`` are tracked, ``meta`` is the run's meta so far."""

    def write_step(
        self,
        step: int,
        stats: Mapping[Site, TensorStats],
        events: tuple[NonFiniteEvent, ...],
        loss_scale: float | None,
        meta: Mapping[str, Any],
    ) -> None:
        """One recorded step closed, with its statistics, non-finite events and loss scale; ``meta`` is
        the run's meta now (the environment can learn facts, e.g. the autocast dtype, as steps run)."""

    def write_anomaly(self, record: AnomalyRecord) -> None:
        """Anomaly mode reported an error in backward (see ``mpdiag.record.anomaly``)."""

    def close(self) -> None:
        """The recording detached; nothing more comes."""

    def discard(self) -> None:
        """The attach failed after ``open``: remove what ``open`` created."""
