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
    """Recording side: the non-finite counts of every observation of the current step, by sequence.

    A device observation's counts are kept by reference until the step closes (no launch in the hook):
    nothing changes them, since an accumulator copies an observation's counts before adding to them.
    """

    def __init__(self) -> None:
        self._host: list[tuple[int, str, Kind, tuple[int, int, int]]] = []
        self._device: list[tuple[int, str, Kind, torch.Tensor, tuple[int, int, int]]] = []
        self._groups: list[list[int]] = []  # indices into _device, one list per tensor device_tensors() gave

    def note(self, seq: int, name: str, kind: Kind, counts: Any, nonfinite_buckets: tuple[int, int, int]) -> None:
        """Remember the (nan, posinf, neginf) buckets of one observation's counts (numpy or device)."""
        if isinstance(counts, np.ndarray):
            nans, posinf, neginf = (int(counts[b]) for b in nonfinite_buckets)
            if nans or posinf or neginf:
                self._host.append((seq, name, kind, (nans, posinf, neginf)))
        else:
            self._device.append((seq, name, kind, counts, nonfinite_buckets))

    def device_tensors(self) -> list[torch.Tensor]:
        """The device observations' (nan, posinf, neginf) counts, gathered now: one (n, 3) tensor per device
        and bucket layout, for the step close to read in its one transfer per device."""
        groups: dict[tuple[torch.device, int, tuple[int, int, int]], list[int]] = {}
        for i, (*_, counts, buckets) in enumerate(self._device):
            groups.setdefault((counts.device, counts.shape[0], buckets), []).append(i)
        self._groups = list(groups.values())
        tensors = []
        for (device, _, buckets), members in groups.items():
            stacked = torch.stack([self._device[i][3] for i in members])
            tensors.append(stacked.index_select(1, torch.tensor(buckets, device=device)))
        return tensors

    def any_nonfinite(self) -> bool:
        """Whether any observation of the step so far held NaN or inf: one read per device holding some."""
        return bool(self._host) or any(bool(t.any()) for t in self.device_tensors())

    def events(self, step: int, device_values: Sequence[np.ndarray]) -> list[NonFiniteEvent]:
        """The step's events, given the host values of ``device_tensors()`` (read at the step close)."""
        raw = list(self._host)
        for members, values in zip(self._groups, device_values):
            for i, row in zip(members, np.asarray(values).reshape(len(members), 3)):
                if np.any(row):
                    seq, name, kind, _, _ = self._device[i]
                    raw.append((seq, name, kind, (int(row[0]), int(row[1]), int(row[2]))))
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
        self._groups = []
