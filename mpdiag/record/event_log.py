"""Recording side of non-finite events: each observation's NaN/inf counts, kept on the device until the
step closes (see ``mpdiag.core.events``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mpdiag.core.events import PHASE_OF_KIND, PHASES, NonFiniteEvent
from mpdiag.core.sites import Kind

__all__ = ["EventLog"]


class EventLog:
    """Recording side: the non-finite counts of every observation of the current step, by sequence."""

    def __init__(self) -> None:
        self._host: list[tuple[int, str, Kind, tuple[int, int, int]]] = []
        self._device: list[tuple[int, str, Kind, torch.Tensor]] = []

    def note(self, seq: int, name: str, kind: Kind, counts: Any, nonfinite_buckets: tuple[int, int, int]) -> None:
        """Remember the (nan, posinf, neginf) buckets of one observation's counts (numpy or device)."""
        if isinstance(counts, np.ndarray):
            nans, posinf, neginf = (int(counts[b]) for b in nonfinite_buckets)
            if nans or posinf or neginf:
                self._host.append((seq, name, kind, (nans, posinf, neginf)))
        else:  # slices: indexing with a list would copy the index to the device first
            self._device.append((seq, name, kind, torch.cat([counts[b : b + 1] for b in nonfinite_buckets])))

    def device_tensors(self) -> list[torch.Tensor]:
        return [t for *_, t in self._device]

    def events(self, step: int, device_values: Sequence[np.ndarray]) -> list[NonFiniteEvent]:
        """The step's events, given the host values of ``device_tensors()`` (read at the step close)."""
        raw = list(self._host) + [
            (seq, name, kind, tuple(int(v) for v in values))
            for (seq, name, kind, _), values in zip(self._device, device_values)
            if np.any(values)
        ]
        raw.sort(key=lambda r: (PHASES.index(PHASE_OF_KIND[r[2]]), r[0]))
        firsts: set[str] = set()
        events: list[NonFiniteEvent] = []
        for seq, name, kind, (nans, posinf, neginf) in raw:
            phase = PHASE_OF_KIND[kind]
            events.append(NonFiniteEvent(step, name, kind, phase, nans, posinf, neginf, seq, phase not in firsts))
            firsts.add(phase)
        return events

    def clear(self) -> None:
        self._host.clear()
        self._device.clear()
