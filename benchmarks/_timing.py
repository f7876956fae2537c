"""Interleaved timing rounds shared by the benchmarks: machine noise hits every variant alike."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping

Variant = tuple[Callable[[], None], Callable[[], contextlib.AbstractContextManager[object]]]


def interleaved_rounds(
    variants: Mapping[str, Variant], rounds: int, steps: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    """Seconds per step of each variant (a step function and the context it runs in), one figure per
    round; in each round every variant runs ``steps`` steps after one untimed step in a fresh context
    (a fresh diagnosis builds its accumulators in its first step). ``clock`` reads the time: on a GPU,
    one that waits for the device first, so that queued work is counted in the steps that queued it."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (step, make) in variants.items():
            with make():
                step()
                start = clock()
                for _ in range(steps):
                    step()
                times[name].append((clock() - start) / steps)
    return times
