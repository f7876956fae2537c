"""One verdict per tracked format: would this run survive in it, and if not, where and why.

A verdict is analysis on plain data (a Run and its loss-scale advice), worded for a person: the report
leads with it and the terminal summary can print it. Every number in the sentence is also a field, so
a program (or a test) can read the facts without parsing text.

What counts, per format:
- overflow: sites whose finite values reach the format's overflow threshold, and the first such step
  (gradients recorded under a GradScaler are scaled: their range is the loss scale's business, judged
  by the advice below, and they are left out here and from the headroom);
- gradients: the share of non-zero finite true gradients (recorded / loss scale) that would flush to
  zero without loss scaling, and the scale the replay recommends when that share is too large;
- activations: the share of non-zero finite activations that would flush to zero;
- headroom: the site whose largest value comes closest to the format's max, in bits;
- fp8 formats, which are used with a scale per tensor: the worst site's flushed share even when each
  tensor is scaled by the power of two that puts its largest value just below the format's max;
- the optimizer's state (``optimizer_state`` sites, with ``optimizer=``): per state key, how many
  parameters' state would overflow or lose more than the tolerated share of its values to underflow if
  stored in the format (an 8-bit or bf16 optimizer, pure low-precision training). It never changes the
  level: autocast keeps the optimizer's state in fp32, so this is what storing it lower would cost;
- the optimizer's updates (with ``optimizer=``, ``mpdiag.analysis.updates``): for weights stored wider,
  the parameters that would lose more than ``TOLERATED_STALL`` of their updates if stored in the format
  (the level stays: that is what moving the weights to it would cost); for weights already stored in
  the format, what they really lost, which makes the verdict at least "warn";
- NaN/inf: a run that held them is at best "warn" in every format (its values were not all seen);
  ``nonfinite_verdict`` says where they came from. The inf of a step a GradScaler skipped (its scaled
  gradients overflowed, as the scaler is designed to find) is not the model's: ``skips_verdict`` says
  how many steps it skipped, and the advice counts those scales as overflowing.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mpdiag.analysis.gradients import exponent_of, flushed_per_step, gradient_sites, scaler_overflows
from mpdiag.analysis.riskiest import SiteRisk, riskiest
from mpdiag.analysis.scaling import LossScaleAdvice, advise
from mpdiag.analysis.updates import ParamShares, UpdatesAnalysis, always_lost_log2, analyse_updates
from mpdiag.core import formats as _formats
from mpdiag.core.errors import MpdiagError
from mpdiag.core.formats import Format, flush_exponent
from mpdiag.core.run import Kind, Run, Site, step_ranges
from mpdiag.core.stats import HIST_EXPONENTS, TensorStats
from mpdiag.core.text import percent
from mpdiag.core.text import shown as _shown

__all__ = [
    "Level",
    "Verdict",
    "verdicts",
    "verdict",
    "nonfinite_verdict",
    "skips_verdict",
    "scaled_underflow",
    "site_label",
]

#: A site whose largest value is fewer bits than this below a format's max is called out.
HEADROOM_BITS = 8
#: Underflow shares at or below this are not worth a warning (the loss-scale window tolerates as much).
TOLERATED_UNDERFLOW = 1e-3


class Level(str, enum.Enum):
    """How bad a verdict is, mildest first: a verdict is as bad as the worst thing it found."""

    OK = "ok"
    WARN = "warn"  # fixable or marginal
    FAIL = "fail"  # values would be lost to overflow, or no loss scale avoids both overflow and underflow

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Verdict:
    """The verdict on one format. ``level`` is ``Level.FAIL`` (values would be lost to overflow, or no
    loss scale avoids both overflow and underflow), ``Level.WARN`` (fixable or marginal) or ``Level.OK``;
    a str enum, so it also equals "fail", "warn" and "ok"."""

    fmt: str
    level: Level
    sentence: str
    overflow_sites: tuple[str, ...]  # site labels, most overflowing values first
    first_overflow_step: int | None
    gradient_underflow: float | None  # share without loss scaling; None when no gradient was recorded
    recommended_scale: float | None  # set when gradients need scaling and some scale helps
    recorded_scale_underflow: float | None  # share flushed at the run's own loss scales; None: none recorded
    activation_underflow: float
    closest: SiteRisk | None  # the site with the least headroom to max
    scaled_underflow: tuple[str, float] | None  # fp8 formats: worst site with per-tensor scaling
    # per optimizer state key that would not fit: (key, parameters affected, parameters with that key,
    # the worst parameter, its share of values lost to underflow or overflow)
    optimizer_state: tuple[tuple[str, int, int, str, float], ...] = ()
    # the updates of weights stored wider that the format would lose (``UpdatesAnalysis.stalled``), and
    # what weights already stored in it really lost (``UpdatesAnalysis.lost``); None where nothing was counted
    stalled_updates: ParamShares | None = None
    lost_updates: ParamShares | None = None


def site_label(name: str, kind: str | Kind) -> str:
    """How a site is named to people: 'blocks.0.attn (activation_grad)' (``Site.label``)."""
    return Site(name, Kind.parse(kind)).label


def verdicts(run: Run, advice: Mapping[str, LossScaleAdvice] | None = None) -> list[Verdict]:
    """A verdict for each of the run's formats. ``advice`` maps format names to ``advise`` results
    already computed (the report shares them with its figures); missing ones are computed here.

    Examples:
        >>> import torch, mpdiag
        >>> layer = torch.nn.Linear(3, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(1.0)
        >>> with mpdiag.diagnose(layer, formats=("fp16", "bf16")) as diag:
        ...     layer(torch.tensor([[3e4, 3e4, 3e4]])).sum().backward()  # 9e4: past fp16's max only
        >>> fp16, bf16 = verdicts(diag.run)
        >>> fp16.level, fp16.first_overflow_step, bf16.level
        (<Level.FAIL: 'fail'>, 0, <Level.OK: 'ok'>)
    """
    if not run.steps:
        raise MpdiagError("the run has no recorded steps; train at least one step with diagnose() attached")
    skips = scaler_overflows(run)
    has_gradients = bool(gradient_sites(run))
    updates = analyse_updates(run)
    out = []
    for name in run.formats:
        fmt = _formats.get(name)
        adv = None
        if has_gradients:
            adv = (advice or {}).get(fmt.name) or advise(run, fmt, scaler_skips=skips)
        ranked = riskiest(run, fmt, n=len(run.sites))
        out.append(verdict(run, fmt, adv, ranked=ranked, scaler_skips=skips, updates=updates))
    return out


def nonfinite_verdict(run: Run, *, scaler_skips: Mapping[int, float] | None = None) -> str | None:
    """Where NaN/inf of the model's own first appeared and how far it spread, or None when the run held
    none (the overflow of a GradScaler's scaled gradients, which it skips, is ``skips_verdict``'s).
    ``scaler_skips``: the run's ``scaler_overflows`` where already computed."""
    skipped = scaler_overflows(run) if scaler_skips is None else scaler_skips
    events = [e for e in run.nonfinite_events() if e.step not in skipped]
    if not events:
        return None
    first = events[0]
    steps = sorted({e.step for e in events})
    sites = {(e.name, e.kind) for e in events}
    text = (
        f"NaN/inf first appeared at step {first.step} in the {first.phase} pass, in "
        f"{site_label(first.name, first.kind)}; {len(sites)} site(s) held non-finite values in "
        f"{len(steps)} step(s)"
    )
    if run.anomalies:
        text += f"; anomaly mode reported {len(run.anomalies)} error(s), first in {run.anomalies[0].node}"
    return text + "."


def skips_verdict(run: Run, *, scaler_skips: Mapping[int, float] | None = None) -> str | None:
    """What the run's GradScaler skipped, as it is designed to (its scaled gradients overflowed), or None.
    ``scaler_skips``: the run's ``scaler_overflows`` where already computed."""
    skipped = scaler_overflows(run) if scaler_skips is None else scaler_skips
    if not skipped:
        return None
    return (
        f"The GradScaler skipped {len(skipped)} of {len(run.steps)} recorded step(s), as it is designed to: "
        f"their scaled gradients overflowed at {_scale_span(run, skipped)} and it backed off (steps "
        f"{step_ranges(sorted(skipped))}). That is routine, not NaN/inf of the model; the loss-scale "
        f"advice counts those scales as overflowing."
    )


def verdict(
    run: Run,
    fmt: Format,
    adv: LossScaleAdvice | None,
    *,
    ranked: Sequence[SiteRisk],
    scaler_skips: Mapping[int, float],
    updates: UpdatesAnalysis | None = None,
) -> Verdict:
    """The verdict on ``fmt`` from what ``verdicts`` computes for every format: the format's advice (None
    without gradients), every site's ``riskiest`` row for it, the run's ``scaler_overflows`` and its
    ``analyse_updates`` (None: the run recorded no updates)."""
    merged = {site: run.stats(site.name, site.kind) for site in run.sites}
    # Under a GradScaler the recorded gradients are scaled: their overflow and headroom belong to the
    # loss scale (the scaler skips such steps and backs off), which the advice judges on the true
    # gradients. Range is judged here on the values the run holds unscaled.
    # The optimizer's state stays in fp32 under autocast, and its updates are added to fp32 weights: whether
    # they would fit a format is their own question, not this format's verdict on training.
    judged = {s: v for s, v in merged.items() if not s.kind.is_optimizer and not (run.loss_scales and _is_gradient(s))}
    overflowing = sorted((s for s in judged if judged[s].overflow(fmt)), key=lambda s: -judged[s].overflow(fmt))
    # Only sites that overflow in some step can overflow in a given one: look at those alone.
    first_overflow = next(
        (
            step
            for step in run.steps
            if any(run.records[step][s].overflow(fmt) for s in overflowing if s in run.records[step])
        ),
        None,
    )
    activation_underflow = _underflow_share([v for s, v in merged.items() if s.kind == Kind.ACTIVATION], fmt)
    closest = min((r for r in ranked if r.site in judged), key=lambda r: r.headroom_bits, default=None)
    training = {s: v for s, v in merged.items() if not s.kind.is_optimizer}
    scaled = _worst_with_tensor_scaling(training, fmt) if _is_fp8(fmt) else None

    parts, level = [], Level.OK
    if overflowing:
        parts.append(f"{len(overflowing)} site(s) overflow, first at step {first_overflow}")
        level = Level.FAIL
    gradient_underflow = recommended = recorded = None
    if adv is not None:
        gradient_underflow = adv.at(1.0).underflow
        recorded = _recorded_scale_underflow(run, fmt) if run.loss_scales else None
        if gradient_underflow > TOLERATED_UNDERFLOW:
            parts.append(f"{percent(gradient_underflow)} of gradients underflow without loss scaling")
            if recorded is not None and recorded <= TOLERATED_UNDERFLOW:
                parts.append(f"the run's own loss scale ({_scale_span(run)}) keeps that to {percent(recorded)}")
            elif adv.window is not None and adv.recommended is not None:
                recommended = adv.recommended
                after = adv.at(recommended).underflow
                parts.append(f"recommended scale 2^{exponent_of(recommended)} ({percent(after)} underflow then)")
                level = _worse(level, Level.WARN)
            else:
                parts.append(
                    f"no loss scale avoids both overflow and underflow (overflow first in "
                    f"{_shown(adv.overflow_limiter)}, underflow worst in {_shown(adv.underflow_limiter)})"
                )
                level = Level.FAIL
    if activation_underflow > TOLERATED_UNDERFLOW:
        parts.append(f"{percent(activation_underflow)} of activations flush to zero")
        level = _worse(level, Level.WARN)
    if scaled is not None and scaled[1] > TOLERATED_UNDERFLOW:
        parts.append(f"even scaled per tensor, {scaled[0]} loses {percent(scaled[1])} to underflow")
        level = _worse(level, Level.WARN)
    if closest is not None and not overflowing:
        if closest.headroom_bits < HEADROOM_BITS:
            parts.append(f"{closest.site.label} comes within {closest.headroom_bits:.1f} bits of max")
            level = _worse(level, Level.WARN)
        else:
            parts.append(f"no site within {HEADROOM_BITS} bits of max")
    # A GradScaler's skipped steps hold inf by design: not the model's.
    contaminated = [
        site
        for site, v in merged.items()
        if v.nonfinite
        and any(
            run.records[step][site].nonfinite
            for step in run.steps
            if step not in scaler_skips and site in run.records[step]
        )
    ]
    if contaminated:  # their NaN/inf hide what the values would have been: the run cannot be called safe
        parts.append(f"{len(contaminated)} site(s) held NaN/inf, judged on their finite values only")
        level = _worse(level, Level.WARN)
    state = _optimizer_state(merged, fmt)
    if state:
        parts.append(
            "if stored in it, the optimizer's "
            + ", ".join(
                f"{key} of {n} of {total} parameters would lose values (worst {worst}: {percent(share)})"
                for key, n, total, worst, share in state
            )
        )
    stalled, lost = _updates_of(updates, fmt)
    if stalled is not None and stalled.called_out:
        parts.append(_stalled_clause(stalled, fmt))
    if lost is not None and lost.called_out:
        parts.append(_lost_clause(lost, fmt))
        level = _worse(level, Level.WARN)
    if not parts:
        parts.append("nothing recorded")
    return Verdict(
        fmt=fmt.name,
        level=level,
        sentence=f"{fmt.name}: " + "; ".join(parts) + ".",
        overflow_sites=tuple(s.label for s in overflowing),
        first_overflow_step=first_overflow,
        gradient_underflow=gradient_underflow,
        recommended_scale=recommended,
        recorded_scale_underflow=recorded,
        activation_underflow=activation_underflow,
        closest=closest,
        scaled_underflow=scaled,
        optimizer_state=state,
        stalled_updates=stalled,
        lost_updates=lost,
    )


def _updates_of(updates: UpdatesAnalysis | None, fmt: Format) -> tuple[ParamShares | None, ParamShares | None]:
    """The updates ``fmt`` would lose with weights stored wider, and what weights stored in it lost."""
    if updates is None:
        return None, None
    dtype = _dtype_name(fmt)
    # What fp32 weights lose is no reason to keep fp32 master weights: judged for narrower formats only.
    narrower = fmt.bits < _formats.get("fp32").bits
    return updates.stalled.get(fmt.name), updates.lost.get(dtype) if dtype is not None and narrower else None


def _stalled_clause(stalled: ParamShares, fmt: Format) -> str:
    worst, share = stalled.worst
    return (
        f"weights stored in it would lose {percent(share)} of the updates of {worst} ({len(stalled.called_out)} "
        f"of {len(stalled.shares)} parameters lose over {percent(stalled.threshold)}; an update below "
        f"2^{always_lost_log2(fmt)} of a weight in its normal range always rounds away)"
    )


def _lost_clause(lost: ParamShares, fmt: Format) -> str:
    worst, share = lost.worst
    return (
        f"its weights stored in {fmt.name} lost {percent(lost.overall)} of their updates (worst {worst}: "
        f"{percent(share)}; {len(lost.called_out)} of {len(lost.shares)} parameters over "
        f"{percent(lost.threshold)}): keep fp32 master weights"
    )


def _dtype_name(fmt: Format) -> str | None:
    """The name UpdateStats gives ``fmt``'s dtype ("bfloat16"); None for a format that is not a dtype."""
    return str(fmt.dtype).replace("torch.", "") if fmt.dtype is not None else None


def _optimizer_state(merged: Mapping[Site, TensorStats], fmt: Format) -> tuple[tuple[str, int, int, str, float], ...]:
    """Per state key (``exp_avg_sq``, ``momentum_buffer``): the parameters whose state in ``fmt`` would
    overflow or flush more than TOLERATED_UNDERFLOW of its non-zero values to zero."""
    by_key: dict[str, list[tuple[str, float]]] = {}
    for site, stats in merged.items():
        if site.kind != Kind.OPTIMIZER_STATE:
            continue
        param, key = site.name.rsplit(".", 1)
        lost = (stats.underflow(fmt) + stats.overflow(fmt)) / stats.finite_nonzero if stats.finite_nonzero else 0.0
        by_key.setdefault(key, []).append((param, lost))
    out = []
    for key, shares in by_key.items():
        losing = [(share, param) for param, share in shares if share > TOLERATED_UNDERFLOW]
        if losing:
            share, param = max(losing)
            out.append((key, len(losing), len(shares), param, share))
    return tuple(out)


def _scale_span(run: Run, steps: Iterable[int] | None = None) -> str:
    chosen = run.loss_scales if steps is None else {s: run.loss_scale(s) for s in steps}
    scales = sorted({exponent_of(v, "a recorded loss scale") for v in chosen.values()})
    return f"2^{scales[0]}" if len(scales) == 1 else f"2^{scales[0]}..2^{scales[-1]}"


def _recorded_scale_underflow(run: Run, fmt: Format) -> float:
    """Share of the non-zero true gradients flushed at the scales the run's GradScaler used, over its steps."""
    counts = flushed_per_step(run, fmt, run.loss_scales).values()
    nonzero = sum(n for _, n in counts)
    return sum(f for f, _ in counts) / nonzero if nonzero else 0.0


def _is_gradient(site: Site) -> bool:
    return site.kind in (Kind.ACTIVATION_GRAD, Kind.PARAM_GRAD)


def _worse(a: Level, b: Level) -> Level:
    order = list(Level)
    return max(a, b, key=order.index)


def _is_fp8(fmt: Format) -> bool:
    return fmt.bits == 8


def _underflow_share(stats: list[TensorStats], fmt: Format) -> float:
    nonzero = sum(s.finite_nonzero for s in stats)
    return sum(s.underflow(fmt) for s in stats) / nonzero if nonzero else 0.0


def scaled_underflow(stats: TensorStats, fmt: Format) -> float:
    """The share of a site's non-zero finite values that flush to zero in ``fmt`` even after scaling the
    tensor by the largest power of two that keeps its largest value below the overflow threshold
    (per-tensor amax scaling, as fp8 recipes do). Whole log2 bins, so exact but for exact ties."""
    if not stats.finite_nonzero:
        return 0.0
    k = math.floor(math.log2(fmt.overflow_threshold / stats.amax))
    if stats.amax * 2.0**k >= fmt.overflow_threshold:  # log2 rounding at an exact power of two
        k -= 1
    flushed = stats.hist[HIST_EXPONENTS < flush_exponent(fmt) - k].sum()
    return float(np.int64(flushed)) / stats.finite_nonzero


def _worst_with_tensor_scaling(merged: Mapping[Site, TensorStats], fmt: Format) -> tuple[str, float] | None:
    shares = [(scaled_underflow(v, fmt), site) for site, v in merged.items() if v.finite_nonzero]
    if not shares:
        return None
    share, site = max(shares, key=lambda pair: pair[0])
    return site.label, share
