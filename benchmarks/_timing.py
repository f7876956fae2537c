"""Interleaved timing rounds shared by the benchmarks: machine noise hits every variant alike."""

from __future__ import annotations

import contextlib
import statistics
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


def median_ratio(times: list[float], reference: list[float]) -> float:
    """The median over rounds of one variant's time over another's in the same round."""
    return statistics.median(t / r for t, r in zip(times, reference))


def print_times(times: Mapping[str, list[float]], observed: str) -> None:
    """Each variant's median time and its ratio to plain, then every=1 against the amax floor (the figure
    the overhead goal is stated in) and what the observers read per step."""
    plain = times["plain"]
    for variant, ts in times.items():
        print(f"{variant:>16}: {statistics.median(ts) * 1e3:7.1f} ms/step   {median_ratio(ts, plain):5.2f}x plain")
    every1_vs_amax = median_ratio(times["mpdiag every=1"], times["amax hooks"])
    print(f"every=1 / amax hooks: {every1_vs_amax:.2f}x (goal <= 1.15)")
    print(observed)
