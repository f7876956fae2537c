"""Comparison: the same model trained in several precisions, side by side, as plain data.

``mpdiag.compare`` fills it (``mpdiag.probe.compare``); ``mpdiag.analysis.convergence`` computes the
convergence figures from the losses; ``str(comparison)`` is the summary, one line per precision.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field

from mpdiag.core.run import Run
from mpdiag.core.text import byte_size, duration, percent, signed_percent

__all__ = ["Comparison", "PrecisionResult", "Convergence", "NoiseBand", "PRECISIONS", "REFERENCE", "speed_ratio"]

#: The precisions compare() trains, in the order it reports them.
PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "bf16-pure")

#: The precision every other one is measured against.
REFERENCE = "fp32"

#: How wide the summary's notes on method are wrapped (the lines per precision are not: one line each).
_WIDTH = 100

#: Step time ratios within this of 1 read "as fast": the timing noise of a shared machine.
_SAME_SPEED = 0.03


@dataclass(frozen=True)
class NoiseBand:
    """fp32's own noise: how far the loss of an fp32 run moves for reasons that have nothing to do with
    precision, per step. A precision whose loss stays within it converges as fp32 does.

    Attributes:
        band: per step, the RMS over the trailing ``window`` steps of the yardstick's distance to fp32's loss.
        window: the steps each RMS covers (and the final loss averages over).
        how: what the yardstick is, as a sentence.
        losses: the yardstick run's losses (the second fp32 run), or None when it is fp32's own
            step-to-step change.
        param_distance: the yardstick run's final parameter distance to fp32 (relative L2), or None.
    """

    band: tuple[float, ...]
    window: int
    how: str
    losses: tuple[float, ...] | None = None
    param_distance: float | None = None


@dataclass(frozen=True)
class Convergence:
    """How one precision's training followed fp32's, against fp32's noise band.

    Attributes:
        difference: per step, (loss - fp32's loss) / the band at that step: within +-1 is within noise.
        first_outside: the step from which the RMS distance to fp32 over the trailing window stays
            above the band to the end (a non-finite loss is outside): where it left fp32 for good; None
            when the last step is within.
        outside_share: the share of the judged steps outside the band at all (early steps often are:
            the band opens from 0 as the two fp32 trajectories part, while rounding shows from step
            0; a step where the band is 0 is not judged).
        final_change: mean loss over the last ``window`` steps relative to fp32's, minus 1 (+0.004:
            0.4% higher); NaN where fp32's is not positive (a loss that reaches 0, a log-likelihood).
        final_difference: the same two means' difference, in the loss's own units.
        final_ratio_to_noise: at the last step, the trailing RMS distance to fp32 over the band.
        diverged_at: the first step whose loss is NaN or inf, or None.
        param_distance: ||params - fp32's params|| / ||fp32's params|| at the end (relative L2).
    """

    difference: tuple[float, ...]
    first_outside: int | None
    outside_share: float
    final_change: float
    final_difference: float
    final_ratio_to_noise: float
    diverged_at: int | None
    param_distance: float

    @property
    def within_noise(self) -> bool:
        """Whether, at the end, the loss is as close to fp32's as fp32's own noise."""
        return self.diverged_at is None and self.final_ratio_to_noise <= 1.0

    def describe(self) -> str:
        """'converges with fp32 (final loss +0.4%, within noise)' and the like."""
        if self.diverged_at is not None:
            return f"diverges at step {self.diverged_at} (the loss is not finite)"
        change = f"final loss {signed_percent(self.final_change)}"
        if not math.isfinite(self.final_change):
            change = f"final loss {self.final_difference:+.4g} (absolute)"
        if not self.within_noise:
            return (
                f"departs from fp32 from step {self.first_outside} on ({change}, "
                f"{self.final_ratio_to_noise:.1f}x fp32's noise)"
            )
        return f"converges with fp32 ({change}, within noise)"


@dataclass(frozen=True)
class PrecisionResult:
    """One precision's training.

    Attributes:
        precision: its name ("fp32", "tf32", "bf16", "fp16", "bf16-pure").
        losses: the loss of every step (a float each; NaN where it was).
        skipped_steps: the steps whose optimizer step did not run (fp16: those its GradScaler skipped).
        step_time: median seconds per step over ``step_times`` (CUDA-synchronised on a GPU; NaN when no
            step could be timed: every one was recorded or skipped).
        step_times: step -> seconds, for the steps timed (see ``Comparison.timing``).
        step_time_spread: the interquartile range of ``step_times`` over their median: how noisy the
            timing was (NaN with fewer than 4 timed steps).
        peak_memory: bytes, the highest of the steps measured (see ``Comparison.memory``).
        memory_steps: the steps whose memory was measured.
        run: what mpdiag recorded of this training (``diagnose=True``), or None.
        convergence: against fp32 (None for fp32 itself).
        notes: what this precision did on this device that its name does not say.
    """

    precision: str
    losses: list[float]
    skipped_steps: list[int]
    step_time: float
    step_times: dict[int, float]
    peak_memory: int
    memory_steps: tuple[int, ...]
    run: Run | None = None
    convergence: Convergence | None = None
    notes: tuple[str, ...] = ()
    step_time_spread: float = math.nan

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan


@dataclass(frozen=True)
class Comparison:
    """The same model trained from the same weights on the same batches in several precisions.

    Attributes:
        results: precision -> its PrecisionResult, fp32 first.
        noise: fp32's noise band, the yardstick of convergence.
        device: where training ran ("cpu", "cuda:0").
        steps: steps trained per precision.
        timing: which steps ``step_time`` is the median of, as a sentence.
        memory: what ``peak_memory`` measures and how, as a sentence.
    """

    results: dict[str, PrecisionResult]
    noise: NoiseBand
    device: str
    steps: int
    timing: str
    memory: str
    notes: tuple[str, ...] = field(default=())

    @property
    def reference(self) -> PrecisionResult:
        return self.results[REFERENCE]

    def line(self, precision: str) -> str:
        """The summary's line for one precision."""
        result = self.results[precision]
        ref = self.reference
        if result is ref:
            diverged = next((t for t, loss in enumerate(ref.losses) if not math.isfinite(loss)), None)
            parts = [
                f"{precision}: the reference (final loss {result.final_loss:.4g})"
                if diverged is None
                else f"{precision}: the reference itself diverges at step {diverged}: nothing to compare with",
                f"{duration(result.step_time)} per step ({_timed(result)})",
                f"peak memory {byte_size(result.peak_memory)}",
            ]
        elif len(result.skipped_steps) == len(result.losses):
            parts = [
                f"{precision}: did not train: the GradScaler skipped all {len(result.losses)} steps (its scale "
                "never came down to one whose gradients fit; grad_scaler={'init_scale': ...} sets where it starts)"
            ]
        else:
            assert result.convergence is not None
            parts = [
                f"{precision}: {result.convergence.describe()}",
                _speed(ref, result),
                _memory(ref.peak_memory, result.peak_memory),
            ]
        if result.skipped_steps:
            parts.append(f"{len(result.skipped_steps)} of {len(result.losses)} steps skipped by the GradScaler")
        return ", ".join(parts) + "".join(f"; {note}" for note in result.notes)

    def __str__(self) -> str:
        head = f"mpdiag compare: {self.steps} steps per precision on {self.device}, from the same weights and batches"
        lines = [head, *(self.line(p) for p in self.results), ""]
        how = [
            f"noise band: {self.noise.how} (RMS over {self.noise.window} steps)",
            f"step time: {self.timing}",
            f"peak memory: {self.memory}",
            *self.notes,
        ]
        lines += [textwrap.fill(text, _WIDTH, subsequent_indent="  ") for text in how]
        return "\n".join(lines)


def speed_ratio(reference: PrecisionResult, result: PrecisionResult) -> float:
    """How many times faster than fp32 a step of ``result`` is (< 1: slower); NaN where not measured."""
    if reference.step_time > 0 and result.step_time > 0:
        return reference.step_time / result.step_time
    return math.nan


def _speed(reference: PrecisionResult, result: PrecisionResult) -> str:
    ratio = speed_ratio(reference, result)
    if not math.isfinite(ratio):
        return "speed not measured (no step both unrecorded and fully run)"
    # within the timing's own spread (or 3%): no difference this run can tell
    spreads = [s for s in (reference.step_time_spread, result.step_time_spread) if math.isfinite(s)]
    noise = max([_SAME_SPEED, *spreads])
    if abs(math.log(ratio)) < math.log1p(noise):
        return f"as fast within the timing noise ({ratio:.2f}x, {_timed(result)})"
    faster = f"{ratio:.2f}x faster" if ratio > 1 else f"{1 / ratio:.2f}x slower"
    return f"{faster} ({_timed(result)})"


def _timed(result: PrecisionResult) -> str:
    n = len(result.step_times)
    spread = f", spread {percent(result.step_time_spread)}" if math.isfinite(result.step_time_spread) else ""
    return f"median of {n} step{'s' if n != 1 else ''}{spread}"


def _memory(reference: int, peak: int) -> str:
    if reference <= 0 or peak <= 0:
        return "peak memory not measured (no step after a completed optimizer step ran one itself)"
    change = peak / reference - 1
    if abs(change) < 0.005:
        return "the same peak memory"
    return f"{percent(abs(change))} {'less' if change < 0 else 'more'} peak memory"
