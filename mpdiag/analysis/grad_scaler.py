"""Replaying a dynamic loss scaler (torch.amp.GradScaler and its DeepSpeed/Megatron/Apex cousins) on a run.

The scaler's decision at each step depends only on whether the scaled gradients overflow, and that is
known exactly from the recorded statistics: a step overflows at scale s when a true gradient is
non-finite or its largest magnitude times s reaches the format's overflow threshold. With default
parameters the update rule is torch's (``torch._amp_update_scale_``, computed in fp32 like torch);
``hysteresis``, ``min_scale`` and ``max_scale`` cover DeepSpeed (hysteresis 2, min scale 1), Megatron
(hysteresis 2) and Apex (max scale 2^24).

Examples:
    >>> import torch, mpdiag
    >>> model = torch.nn.Linear(4, 1, bias=False)
    >>> with mpdiag.diagnose(model) as diag:
    ...     for _ in range(4):
    ...         model.zero_grad()
    ...         (model(torch.full((1, 4), 0.5)).sum() * 0.3).backward()  # largest gradient: 0.3
    ...         diag.step()
    >>> sim = simulate_grad_scaler(diag.run, init_scale=2.0**18)  # 0.3 * 2^18 > 65520: overflow
    >>> sim.skipped, sim.scales[-1]
    ((True, False, False, False), 131072.0)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mpdiag.analysis.gradients import gradient_sites, skips_within, true_gradient_steps
from mpdiag.core import formats as _formats
from mpdiag.core.errors import MpdiagError, MpdiagWarning
from mpdiag.core.formats import Format
from mpdiag.core.run import Run

__all__ = [
    "simulate_grad_scaler",
    "simulate_run_scaler",
    "GradScalerSimulation",
    "scaler_trajectory",
    "recorded_settings",
    "APPROXIMATE",
]

#: Why a replay of a run that did not record every step is approximate: the warning, and the note of ``analyse``.
APPROXIMATE = (
    "the run did not record every step, so the replayed GradScaler trajectory is approximate: "
    "record with every=1 to replay it exactly"
)


@dataclass(frozen=True)
class GradScalerSimulation:
    """The loss scale a dynamic scaler would use at each recorded step, and the steps it would skip.

    Attributes:
        steps: recorded step indices. scales: the scale used in each. skipped: whether it overflowed.
        final_scale: the scale after the last step's update.
    """

    fmt: Format
    steps: tuple[int, ...]
    scales: tuple[float, ...]
    skipped: tuple[bool, ...]
    final_scale: float
    approximate: bool

    @property
    def skipped_steps(self) -> list[int]:
        return [s for s, skip in zip(self.steps, self.skipped) if skip]

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped)

    def __str__(self) -> str:
        scales = sorted(set(self.scales))
        note = " (approximate: not every step was recorded)" if self.approximate else ""
        return (
            f"GradScaler replay for {self.fmt.name}{note}: {len(self.steps)} steps, {self.total_skipped} skipped "
            f"{self.skipped_steps[:10]}{'...' if self.total_skipped > 10 else ''}; scale from "
            f"2^{math.log2(scales[0]):g} to 2^{math.log2(scales[-1]):g}, final 2^{math.log2(self.final_scale):g}"
        )


def scaler_trajectory(
    overflows: Callable[[int, float], bool],
    n_steps: int,
    *,
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
    hysteresis: int = 1,
    min_scale: float | None = None,
    max_scale: float | None = None,
) -> tuple[list[float], list[bool], float]:
    """Run the dynamic-scaler update rule: ``overflows(i, scale)`` says whether step i overflows at scale.

    Returns (the scale used at each step, whether each step was skipped, the final scale).
    """
    _check(init_scale, growth_factor, backoff_factor, growth_interval, hysteresis)
    scale = np.float32(init_scale)  # torch keeps the scale in an fp32 tensor
    tracker, hysteresis_left = 0, hysteresis
    scales, skipped = [], []
    for i in range(n_steps):
        scales.append(float(scale))
        found_inf = overflows(i, float(scale))
        skipped.append(found_inf)
        if found_inf:
            tracker = 0
            if hysteresis_left > 1:  # DeepSpeed/Megatron: tolerate a few overflows before backing off
                hysteresis_left -= 1
                continue
            scale = _times(scale, backoff_factor)
            if min_scale is not None:
                scale = max(scale, np.float32(min_scale))
            continue
        tracker += 1
        if tracker == growth_interval:
            grown = _times(scale, growth_factor)
            if np.isfinite(grown):
                scale = grown if max_scale is None else min(grown, np.float32(max_scale))
            tracker, hysteresis_left = 0, hysteresis
    return scales, skipped, float(scale)


def simulate_grad_scaler(
    run: Run,
    fmt: str | torch.dtype | Format = "fp16",
    *,
    init_scale: float | None = None,
    growth_factor: float | None = None,
    backoff_factor: float | None = None,
    growth_interval: int | None = None,
    hysteresis: int = 1,
    min_scale: float | None = None,
    max_scale: float | None = None,
    steps: Sequence[int] | None = None,
) -> GradScalerSimulation:
    """Replay a dynamic loss scaler over the recorded steps' true gradients.

    The four settings of torch's GradScaler default to those of the run's own scaler where one was
    recorded (``diagnose(scaler=...)``; ``init_scale``: the scale it had at the first step replayed),
    else to torch's defaults (init_scale 2^16, growth_factor 2, backoff_factor 0.5, growth_interval 2000).
    From the run's own settings the replay skips the steps the real scaler skipped, as long as its
    growth counter started with the replay (attached when training began: mpdiag cannot read it).

    Warns (MpdiagWarning) when the run did not record every step: the scaler then also reacts to steps
    mpdiag did not see, and the trajectory is approximate.

    Examples:
        >>> import torch, mpdiag
        >>> model = torch.nn.Linear(4, 1)
        >>> with mpdiag.diagnose(model) as diag:
        ...     for _ in range(3):
        ...         model.zero_grad()
        ...         (model(torch.ones(1, 4)).sum() * 2.0).backward()  # largest gradient: 2
        ...         diag.step()
        >>> sim = mpdiag.simulate_grad_scaler(diag.run, init_scale=2.0**16)  # 2 * 2^15 still reaches 65520
        >>> sim.skipped, sim.final_scale
        ((True, True, False), 16384.0)
    """
    given = {
        "init_scale": init_scale,
        "growth_factor": growth_factor,
        "backoff_factor": backoff_factor,
        "growth_interval": growth_interval,
    }
    simulation = _simulate(
        run,
        _formats.get(fmt),
        given,
        hysteresis=hysteresis,
        min_scale=min_scale,
        max_scale=max_scale,
        steps=steps,
        scaler_skips=None,
    )
    if simulation.approximate:
        warnings.warn(APPROXIMATE, MpdiagWarning, stacklevel=2)
    return simulation


def simulate_run_scaler(run: Run, fmt: Format, scaler_skips: Mapping[int, float]) -> GradScalerSimulation:
    """The replay ``simulate_grad_scaler(run, fmt)`` makes (the run's own GradScaler settings where recorded,
    every step), without its warning: ``approximate`` says as much, and ``analyse`` shows it as a note.
    ``scaler_skips`` is the run's ``scaler_overflows``, computed once by the caller."""
    return _simulate(run, fmt, {}, hysteresis=1, min_scale=None, max_scale=None, steps=None, scaler_skips=scaler_skips)


def _simulate(
    run: Run,
    fmt: Format,
    given: Mapping[str, Any],
    *,
    hysteresis: int,
    min_scale: float | None,
    max_scale: float | None,
    steps: Sequence[int] | None,
    scaler_skips: Mapping[int, float] | None,
) -> GradScalerSimulation:
    chosen = true_gradient_steps(run, steps)
    sites = gradient_sites(run)
    if not sites:
        raise MpdiagError("the run recorded no gradients; call backward() while diagnose() is attached")
    approximate = int(run.meta.get("every", 1)) > 1 or chosen != list(range(chosen[0], chosen[-1] + 1))
    recorded = recorded_settings(run)
    if chosen[0] in run.loss_scales:  # the scale the run's own scaler had at the first step replayed
        recorded["init_scale"] = run.loss_scale(chosen[0])
    settings = {**_TORCH_DEFAULTS, **recorded, **{k: v for k, v in given.items() if v is not None}}
    overflowed = skips_within(run, chosen, scaler_skips)  # steps the run's own GradScaler skipped
    peaks = [_largest_true_gradient(run, step, sites, overflowed.get(step, math.inf)) for step in chosen]
    scales, skipped, final = scaler_trajectory(
        lambda i, scale: peaks[i] * scale >= fmt.overflow_threshold,
        len(chosen),
        hysteresis=hysteresis,
        min_scale=min_scale,
        max_scale=max_scale,
        **settings,
    )
    return GradScalerSimulation(fmt, tuple(chosen), tuple(scales), tuple(skipped), final, approximate)


_TORCH_DEFAULTS: dict[str, Any] = {
    "init_scale": 2.0**16,
    "growth_factor": 2.0,
    "backoff_factor": 0.5,
    "growth_interval": 2000,
}


def recorded_settings(run: Run) -> dict[str, Any]:
    """The settings of the GradScaler the run was recorded under (``diagnose(scaler=...)``), or {}."""
    recorded = (run.meta.get("environment") or {}).get("grad_scaler") or {}
    return {k: recorded[k] for k in _TORCH_DEFAULTS if recorded.get(k) is not None}


def _times(scale: np.float32, factor: float) -> np.float32:
    # As torch's kernel: the fp32 scale times the double factor, in double, stored back into fp32.
    return np.float32(float(scale) * factor)


def _largest_true_gradient(run: Run, step: int, sites: list, nonfinite_bound: float) -> float:
    """max |true gradient| of a step. Where some were non-finite: at least ``nonfinite_bound`` (inf for
    the model's own NaN/inf, so every scale overflows; for a step a GradScaler skipped, the smallest true
    gradient that overflows at the scale it was recorded at)."""
    stats = [run.records[step][s] for s in sites if s in run.records[step]]
    largest = max((s.amax for s in stats), default=0.0) / run.loss_scale(step)
    return max(largest, nonfinite_bound) if any(s.nonfinite for s in stats) else largest


def _check(init_scale: float, growth: float, backoff: float, interval: int, hysteresis: int) -> None:
    if not (init_scale > 0 and growth > 1.0 and 0.0 < backoff < 1.0 and interval >= 1 and hysteresis >= 1):
        raise MpdiagError(
            "expected init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1 and "
            f"hysteresis >= 1; got {init_scale}, {growth}, {backoff}, {interval}, {hysteresis}"
        )
