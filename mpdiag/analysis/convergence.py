"""Convergence of a precision against fp32, judged by fp32's own noise: pure functions on loss lists.

The yardstick: two fp32 trainings from the same weights end up in different places for reasons that
have nothing to do with precision (the order the batches come in, the dropout masks drawn). The second
one's loss on fp32's batch of each step, with fp32's dropout masks, minus fp32's, says how far apart
the two trajectories are, with the batch-to-batch spread of the loss taken out (a precision's loss is
compared on the same batch too). That distance, as an RMS over a trailing window of steps, is the
**noise band**. It starts at 0 (same weights, same batch) and widens as the trajectories part. A
precision whose loss stays as close to fp32's as the band converges as fp32 does; one further off
changes training more than reshuffling the data does. Its rounding shows from step 0, before the band
has opened, so early steps are often outside: ``first_outside`` is the step from which it stays outside
to the end (it left and did not come back), ``outside_share`` how many steps were outside at all.

Without a second fp32 run, fp32's own step-to-step change stands in: two consecutive losses differ by
batch noise plus progress, so |L(t) - L(t-1)| / sqrt(2) estimates the noise of one loss (it errs wide
where the loss falls fast).

Examples:
    >>> from mpdiag.analysis.convergence import convergence, noise_band
    >>> fp32 = [4.0, 3.0, 2.5, 2.2, 2.0, 1.9]
    >>> noise = noise_band(fp32, [4.1, 3.2, 2.4, 2.3, 2.1, 1.8], window=3)
    >>> [round(b, 3) for b in noise.band]
    [0.1, 0.158, 0.141, 0.141, 0.1, 0.1]
    >>> c = convergence([4.0, 3.01, 2.52, 2.21, 2.0, 1.92], fp32, noise, param_distance=0.01)
    >>> c.first_outside, c.within_noise, round(c.final_change, 4)
    (None, True, 0.0049)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mpdiag.core.comparison import Convergence, NoiseBand

__all__ = ["window_for", "noise_band", "step_noise_band", "convergence"]

#: Trailing-window length bounds: at least 3 steps to have an RMS at all, at most 25 to stay local.
_MIN_WINDOW, _MAX_WINDOW = 3, 25

IDENTICAL_YARDSTICK = (
    "the second fp32 training came out identical to fp32 (the same batch every step and no random draws?), so "
)
REORDERED = (
    "a second fp32 training on the batches in another order with other random draws, its loss taken "
    "on fp32's batch of each step with fp32's dropout masks"
)
STEP_TO_STEP = "fp32's own step-to-step change of the loss, / sqrt(2) (no second fp32 run)"


def window_for(steps: int) -> int:
    """The trailing window for a run of ``steps`` steps: a tenth of it, within [3, 25]."""
    return min(max(steps // 10, _MIN_WINDOW), _MAX_WINDOW)


def noise_band(
    reference: Sequence[float],
    other: Sequence[float],
    window: int | None = None,
    *,
    param_distance: float | None = None,
) -> NoiseBand:
    """The band from a second fp32 run (``other``: its losses on fp32's batches) of as many steps as
    ``reference``; ``param_distance``: its final parameter distance to fp32, kept for scale."""
    if len(other) != len(reference):
        raise ValueError(f"the two fp32 runs have {len(reference)} and {len(other)} steps; they must match")
    window = window or window_for(len(reference))
    distance = [abs(a - b) for a, b in zip(reference, other)]
    band = _trailing_rms(distance, window)
    return NoiseBand(band=band, window=window, how=REORDERED, losses=tuple(other), param_distance=param_distance)


def step_noise_band(reference: Sequence[float], window: int | None = None, *, why: str = "") -> NoiseBand:
    """The band from fp32's own step-to-step change (one run); ``why``: the reason it stands in, if any."""
    window = window or window_for(len(reference))
    change = [abs(b - a) / math.sqrt(2) for a, b in zip(reference, reference[1:])]
    change = change[:1] + change if change else [0.0] * len(reference)  # step 0 has no predecessor
    return NoiseBand(band=_trailing_rms(change, window), window=window, how=why + STEP_TO_STEP)


def convergence(
    losses: Sequence[float], reference: Sequence[float], noise: NoiseBand, *, param_distance: float
) -> Convergence:
    """How ``losses`` follow fp32's ``reference`` losses, step by step, against ``noise``."""
    if len(losses) != len(reference) or len(noise.band) != len(reference):
        raise ValueError(
            f"losses ({len(losses)}), fp32's ({len(reference)}) and the band ({len(noise.band)}) cover different steps"
        )
    difference = [a - b for a, b in zip(losses, reference)]
    deviation = _trailing_rms([abs(d) for d in difference], noise.window)
    # A step where the band is 0 is not judged (step 0 from the same weights, batch and masks: the
    # trajectories have not parted yet, while a precision's rounding shows at once); NaN is outside.
    judged = [band > 0 or not math.isfinite(dev) for dev, band in zip(deviation, noise.band)]
    outside = [j and not (dev <= band) for j, dev, band in zip(judged, deviation, noise.band)]
    diverged_at = next((t for t, loss in enumerate(losses) if not math.isfinite(loss)), None)
    tail = slice(-noise.window, None)
    final_difference = _mean(losses[tail]) - _mean(reference[tail]) if losses else math.nan
    scale = _mean(reference[tail]) if losses else math.nan
    return Convergence(
        difference=tuple(_ratio(d, b) for d, b in zip(difference, noise.band)),
        first_outside=_stays_outside_from(outside),
        outside_share=sum(outside) / max(1, sum(judged)),
        # relative to fp32's final loss where that is a positive scale; a loss that reaches 0 or goes
        # negative (a hinge loss, a log-likelihood) has only the absolute difference
        final_change=final_difference / scale if scale > 0 else math.nan,
        final_difference=final_difference,
        final_ratio_to_noise=_ratio(deviation[-1], noise.band[-1]) if losses else math.nan,
        diverged_at=diverged_at,
        param_distance=param_distance,
    )


def _stays_outside_from(outside: Sequence[bool]) -> int | None:
    """The first step of the last stretch of steps outside the band, when that stretch reaches the end."""
    if not outside or not outside[-1]:
        return None
    t = len(outside) - 1
    while t > 0 and outside[t - 1]:
        t -= 1
    return t


def _trailing_rms(values: Sequence[float], window: int) -> tuple[float, ...]:
    out = []
    for t in range(len(values)):
        part = values[max(0, t - window + 1) : t + 1]
        out.append(math.sqrt(sum(v * v for v in part) / len(part)))
    return tuple(out)


def _ratio(value: float, band: float) -> float:
    """``value`` in units of the band: 0 where both are, NaN (no yardstick) where only the band is 0."""
    if band > 0:
        return value / band
    return 0.0 if value == 0 else math.nan


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
