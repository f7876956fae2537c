"""Interleaved timing rounds shared by the benchmarks: machine noise hits every variant alike."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterable, Mapping

Variant = tuple[Callable[[], None], Callable[[], contextlib.AbstractContextManager[object]]]


def interleaved_rounds(
    variants: Mapping[str, Variant],
    rounds: int,
    steps: int | Mapping[str, int],
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per step of each variant (a step function and the context it runs in), one figure per
    round; in each round every variant runs ``steps`` steps (a number, or one per variant) after one
    untimed step in a fresh context (a fresh diagnosis builds its accumulators in its first step).
    ``clock`` reads the time: on a GPU, one that waits for the device first, so that queued work is
    counted in the steps that queued it."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (step, make) in variants.items():
            n = steps if isinstance(steps, int) else steps[name]
            with make():
                step()
                start = clock()
                for _ in range(n):
                    step()
                times[name].append((clock() - start) / n)
    return times


def whole_cycles(names: Iterable[str], steps: int) -> dict[str, int]:
    """Steps per round for each variant: ``steps``, rounded up to whole recording cycles for a variant
    named "... every=N". Its untimed first step is recorded; the timed ones then end on a recorded step
    (steps 1..N record only step N), so that they hold one recorded step in N, as a long run does."""
    cycles = {}
    for name in names:
        every = int(name.rsplit("every=", 1)[1]) if "every=" in name else 1
        cycles[name] = -(-steps // every) * every
    return cycles


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
    if "amax +params" in times:
        print(f"every=1 / amax +params: {median_ratio(times['mpdiag every=1'], times['amax +params']):.2f}x")
    print(observed)
