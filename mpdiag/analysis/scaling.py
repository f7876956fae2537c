"""Loss-scale replay: what each power-of-two loss scale would do to the recorded gradients.

``advise(run, "fp16")`` replays loss scaling analytically on the statistics of the ``activation_grad``
and ``param_grad`` sites: for every scale 2^k over the whole range the data spans, per site and
overall, whether any gradient would overflow (a GradScaler would skip the step) and which fraction of
the non-zero finite gradients would flush to zero or become subnormal. Multiplying by 2^k is exact, so
the overflow decision is exact (it depends on amax alone) and so is the underflow fraction (whole
log2 bins lie below the format's zero tie), except for values lying exactly on that tie.

NB: the subnormal fraction counts the whole bin just below the min normal; values within half an ulp
of it round up to normal and are counted as subnormal.

Examples:
    >>> import torch, mpdiag
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(64, 64)
    >>> with mpdiag.diagnose(model) as diag:
    ...     (model(torch.randn(8, 64)).sum() * 1e-7).backward()  # tiny gradients
    >>> adv = advise(diag.run, "fp16")
    >>> round(adv.at(1.0).underflow, 2), adv.at(adv.recommended).underflow, adv.recommended == 2.0**35
    (0.08, 0.0, True)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mpdiag.analysis.gradients import exponent_of, gradient_sites, skips_within, true_gradient_steps, true_stats
from mpdiag.core import formats as _formats
from mpdiag.core.errors import MpdiagError
from mpdiag.core.formats import Format, flush_exponent
from mpdiag.core.run import Kind, Run, Site, step_ranges
from mpdiag.core.stats import HIST_EXPONENTS, TensorStats
from mpdiag.core.text import display_name, percent
from mpdiag.core.text import shown as _shown

__all__ = ["advise", "LossScaleAdvice", "ScaleOutcome"]


@dataclass(frozen=True)
class ScaleOutcome:
    """What one loss scale does, for one site or for all gradient sites together.

    Attributes:
        scale: the loss scale.
        overflow: some gradient reaches the format's overflow threshold (or is already non-finite).
        underflow, subnormal: fractions of the non-zero finite gradients flushed to zero / left subnormal.
        overflow_sites: names of the sites that overflow, largest gradient first.
        worst_underflow_site: the site losing the largest fraction to underflow, or None when none does.
    """

    scale: float
    overflow: bool
    underflow: float
    subnormal: float
    overflow_sites: tuple[str, ...] = ()
    worst_underflow_site: str | None = None


@dataclass(frozen=True)
class _Curves:
    """Gradient sites over the chosen steps, as arrays: enough to answer any scale exactly, for all
    sites at once (a large model has a thousand gradient sites and the replay tries hundreds of scales)."""

    sites: tuple[Site, ...]
    nonzero: np.ndarray  # (sites,) non-zero finite gradients
    amax: np.ndarray  # (sites,) largest true |gradient| (inf when a step had non-finite gradients)
    below: np.ndarray  # (sites, bins + 1): below[:, i] = values in histogram bins before HIST_EXPONENTS[i]

    @classmethod
    def of(cls, per_site: Mapping[Site, Sequence[TensorStats]], implied: Mapping[Site, float]) -> _Curves:
        """From each site's true statistics per step and, for sites that held NaN/inf, the largest value
        those imply (``_implied_peaks``): inf for NaN/inf of the model (every scale overflows), the
        smallest overflowing true gradient for a step a GradScaler skipped (scales from that step's on
        overflow; nothing is known below it)."""
        hists = np.array(
            [
                np.sum([s.hist for s in stats], axis=0) if stats else np.zeros(len(HIST_EXPONENTS))
                for stats in per_site.values()
            ],
            dtype=np.int64,
        ).reshape(len(per_site), len(HIST_EXPONENTS))
        amax = [
            max(max((s.amax for s in stats), default=0.0), implied.get(site, 0.0)) for site, stats in per_site.items()
        ]
        below = np.concatenate([np.zeros((len(per_site), 1), dtype=np.int64), np.cumsum(hists, axis=1)], axis=1)
        return cls(tuple(per_site), hists.sum(axis=1), np.array(amax, dtype=np.float64), below)

    def count_below(self, exponent: int) -> np.ndarray:
        """Values with |x| < 2^exponent, per site: whole bins, so exact."""
        return self.below[:, min(max(exponent - int(HIST_EXPONENTS[0]), 0), len(HIST_EXPONENTS))]

    def only(self, index: int) -> _Curves:
        return _Curves(
            (self.sites[index],),
            self.nonzero[index : index + 1],
            self.amax[index : index + 1],
            self.below[index : index + 1],
        )


@dataclass(frozen=True)
class LossScaleAdvice:
    """The replay of every power-of-two loss scale on the recorded gradients. See ``advise``.

    Attributes:
        fmt: the format the gradients would be cast to.
        exponents: k of every replayed scale 2^k, ascending.
        recommended: the largest 2^k that stays ``margin_bits`` below overflow at every recorded step
            with finite gradients (and below the scale of every step a GradScaler skipped); 1.0 in a
            format with fp32's exponent range (bf16) when scale 1 is in the window (no loss scaling
            needed); None when there is none.
        window: (low, high): the scales at which nothing overflows and at most ``max_underflow`` of the
            gradients underflow; None when no scale does both (the gradients' dynamic range exceeds
            the format): ``limiting_sites`` then says who is responsible.
        overflow_limiter: the site that overflows first as the scale grows.
        underflow_limiter: the site losing most to underflow at the top of the overflow-free range.
        nonfinite_steps: steps whose true gradients held NaN or inf of the model's own (the forward or an
            unscaled backward made them); no scale helps there.
        skipped_steps: steps a GradScaler skipped, as it is designed to: their scaled gradients overflowed
            at the step's loss scale. They say that scale and larger ones overflow, nothing more.
    """

    fmt: Format
    steps: tuple[int, ...]
    margin_bits: int
    max_underflow: float
    exponents: np.ndarray
    recommended: float | None
    window: tuple[float, float] | None
    overflow_limiter: str | None
    underflow_limiter: str | None
    nonfinite_steps: tuple[int, ...]
    skipped_steps: tuple[int, ...] = ()
    _curves: _Curves = field(repr=False, default=None)  # type: ignore[assignment]

    @property
    def sites(self) -> list[Site]:
        return list(self._curves.sites)

    def at(self, scale: float, site: Site | tuple[str, str] | None = None) -> ScaleOutcome:
        """The outcome of loss scale ``scale`` (a power of two) for one site, or overall when None."""
        curves = self._curves if site is None else self._curve(site)
        return _outcome(curves, exponent_of(scale), self.fmt)

    def curve(self, site: Site | tuple[str, str] | None = None) -> list[ScaleOutcome]:
        """The outcome at every replayed scale, ascending (for plotting underflow against log2(scale))."""
        return [self.at(2.0 ** int(k), site) for k in self.exponents]

    def most_demanding(self, n: int | None = None) -> list[Site]:
        """Gradient sites ordered by the loss scale each needs to keep its own underflow at or below
        ``max_underflow``, the most demanding first (sites without non-zero gradients left out)."""
        c = self._curves
        allowed = np.floor(self.max_underflow * c.nonzero)
        # below[:, i] grows with i: the last column still within the allowance says how small the
        # site's values get, so the fewer such columns, the larger the scale the site needs.
        within = (c.below <= allowed[:, None]).sum(axis=1)
        order = [i for i in np.argsort(within, kind="stable") if c.nonzero[i]]
        return [c.sites[i] for i in order[:n]]

    def _curve(self, site: Site | tuple[str, str]) -> _Curves:
        wanted = Site(site[0], Kind.parse(site[1]))
        if wanted in self._curves.sites:
            return self._curves.only(self._curves.sites.index(wanted))
        raise MpdiagError(
            f"{wanted.name!r} ({wanted.kind}) is not a gradient site of this advice; "
            f"gradient sites are activation_grad and param_grad sites, e.g. {self.sites[:3]}"
        )

    @property
    def limiting_sites(self) -> tuple[str | None, str | None]:
        """(the site that overflows first, the site that underflows most)."""
        return self.overflow_limiter, self.underflow_limiter

    def __str__(self) -> str:
        lines = [
            f"Loss-scale advice for {self.fmt.name} over {len(self.steps)} recorded step(s), "
            f"{len(self._curves.sites)} gradient sites:"
        ]
        if self.recommended is None:
            lines.append("  no loss scale keeps every step below overflow")
        else:
            at = self.at(self.recommended)
            lines.append(
                f"  recommended scale 2^{exponent_of(self.recommended)} ({self.margin_bits} bit(s) below "
                f"overflow): {percent(at.underflow)} of gradients underflow, {percent(at.subnormal)} subnormal"
            )
        if self.window is None:
            lines.append(
                f"  no scale keeps underflow at or below {percent(self.max_underflow)} without overflowing: "
                f"the gradients span more than {self.fmt.name} represents "
                f"(overflow first in {_shown(self.overflow_limiter)}, "
                f"underflow worst in {_shown(self.underflow_limiter)})"
            )
        else:
            low, high = (exponent_of(v) for v in self.window)
            lines.append(
                f"  window 2^{low} .. 2^{high}: no overflow and at most {percent(self.max_underflow)} underflow"
            )
        without = self.at(1.0)
        lines.append(
            f"  without scaling: {percent(without.underflow)} underflow" + (", overflow" if without.overflow else "")
        )
        if self.overflow_limiter:
            lines.append(f"  overflows first: {display_name(self.overflow_limiter)}")
        if self.skipped_steps:
            lines.append(
                f"  the GradScaler skipped {len(self.skipped_steps)} step(s), as it is designed to: their "
                f"scaled gradients overflowed (steps {step_ranges(list(self.skipped_steps))})"
            )
        if self.nonfinite_steps:
            lines.append(f"  steps with NaN/inf gradients before any scaling: {list(self.nonfinite_steps)}")
        return "\n".join(lines)


def advise(
    run: Run,
    fmt: str | torch.dtype | Format = "fp16",
    *,
    steps: Sequence[int] | None = None,
    margin_bits: int = 1,
    max_underflow: float = 1e-3,
    scaler_skips: Mapping[int, float] | None = None,
) -> LossScaleAdvice:
    """Replay every power-of-two loss scale on the recorded gradients and recommend one.

    Args:
        run: a recorded run; its gradients are divided by ``run.loss_scales`` (true gradients).
        fmt: the format gradients would be cast to (fp16 needs scaling; bf16 almost never does).
        steps: recorded steps to consider (default all).
        margin_bits: how far below overflow the recommended scale keeps the largest gradient.
        max_underflow: the underflow fraction the window tolerates.
        scaler_skips: ``mpdiag.analysis.gradients.scaler_overflows(run)`` where already computed (``analyse``
            shares it between its analyses); computed here when None.

    Examples:
        >>> import torch, mpdiag
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(16, 16)
        >>> with mpdiag.diagnose(model) as diag:
        ...     (model(torch.randn(4, 16)).sum() * 1e-9).backward()  # gradients near 1e-9
        >>> adv = mpdiag.advise(diag.run, "fp16")
        >>> adv.at(1.0).underflow > 0.5, adv.at(adv.recommended).underflow
        (True, 0.0)
    """
    fmt = _formats.get(fmt)
    if margin_bits < 0 or not 0.0 <= max_underflow < 1.0:
        raise MpdiagError(f"expected margin_bits >= 0 and 0 <= max_underflow < 1, got {margin_bits}, {max_underflow}")
    chosen = true_gradient_steps(run, steps)
    sites = gradient_sites(run)
    if not sites:
        raise MpdiagError(
            "the run recorded no gradients (activation_grad or param_grad sites); "
            "call backward() while diagnose() is attached"
        )
    per_step = {
        step: {site: true_stats(run, site, step) for site in sites if site in run.records[step]} for step in chosen
    }
    skipped = skips_within(run, chosen, scaler_skips)
    nonfinite_steps = tuple(
        s for s, stats in per_step.items() if s not in skipped and any(v.nonfinite for v in stats.values())
    )
    exponents = _exponent_range(per_step.values(), fmt)

    implied = _implied_peaks({s: per_step[s] for s in nonfinite_steps}, skipped)
    bounds = _implied_peaks({s: per_step[s] for s in skipped}, skipped)  # a skip still bounds the scale
    curves = _Curves.of(
        {site: [v[site] for v in per_step.values() if site in v] for site in sites},
        {site: max(implied.get(site, 0.0), bounds.get(site, 0.0)) for site in implied.keys() | bounds},
    )
    finite_steps = [v for s, v in per_step.items() if s not in nonfinite_steps]
    finite_curves = _Curves.of({site: [v[site] for v in finite_steps if site in v] for site in sites}, bounds)
    recommended = _recommend(finite_curves, exponents, margin_bits, fmt)
    window, underflow_limiter = _window(finite_curves, exponents, fmt, max_underflow)
    if _needs_no_scaling(finite_curves, fmt, max_underflow):
        recommended = 1.0
    with_values = np.flatnonzero(curves.amax > 0)
    largest = with_values[np.argmax(curves.amax[with_values])] if with_values.size else None
    return LossScaleAdvice(
        fmt=fmt,
        steps=tuple(chosen),
        margin_bits=margin_bits,
        max_underflow=max_underflow,
        exponents=exponents,
        recommended=recommended,
        window=window,
        overflow_limiter=curves.sites[largest].name if largest is not None else None,
        underflow_limiter=underflow_limiter,
        nonfinite_steps=nonfinite_steps,
        skipped_steps=tuple(skipped),
        _curves=curves,
    )


def _implied_peaks(
    per_step: Mapping[int, Mapping[Site, TensorStats]], skipped: Mapping[int, float]
) -> dict[Site, float]:
    """For each site that held NaN/inf in some step, the largest true |gradient| that implies: the bound
    of a step a GradScaler skipped, inf for NaN/inf of the model's own."""
    implied: dict[Site, float] = {}
    for step, stats in per_step.items():
        for site, v in stats.items():
            if v.nonfinite:
                implied[site] = max(implied.get(site, 0.0), skipped.get(step, math.inf))
    return implied


def _needs_no_scaling(curves: _Curves, fmt: Format, max_underflow: float) -> bool:
    """A format with fp32's exponent range (bf16) in which, unscaled, nothing overflows and at most
    ``max_underflow`` of the gradients flush to zero: scale 1 is in the window, and a larger scale would
    only move the gradients within a range they already fit.

    NB: fp16 keeps the largest safe scale even then: its range is narrow, and the headroom below is what
    protects gradients that shrink later in training (what a GradScaler keeps by growing its scale).
    """
    if fmt.min_normal != _formats.FP32.min_normal:
        return False
    unscaled = _outcome(curves, 0, fmt)
    return bool(curves.nonzero.sum()) and not unscaled.overflow and unscaled.underflow <= max_underflow


def _normal_exponent(fmt: Format) -> int:
    return math.frexp(fmt.min_normal)[1] - 1


_MIN_SCALE_EXPONENT, _MAX_SCALE_EXPONENT = (
    math.frexp(np.finfo(np.float64).tiny)[1] - 1,
    math.frexp(np.finfo(np.float64).max)[1] - 1,
)


def _exponent_range(steps: Iterable[dict[Site, TensorStats]], fmt: Format) -> np.ndarray:
    """From the scale where every gradient underflows to the one where the smallest overflows."""
    stats = [v for step in steps for v in step.values() if v.finite_nonzero]
    if not stats:
        return np.arange(-1, 2)
    largest = max(v.amax for v in stats)
    smallest = min(v.amin_nonzero for v in stats)
    # In log space: 2^-134 / 1e300 (bf16's flush point under fp64 gradients) would underflow to 0.
    low = math.floor(flush_exponent(fmt) - math.log2(largest)) - 1
    high = math.ceil(math.log2(fmt.overflow_threshold) - math.log2(smallest)) + 1
    # A loss scale is itself a float: 2^k stays a normal double (fp64 gradients can span past that).
    return np.arange(max(low, _MIN_SCALE_EXPONENT), min(high, _MAX_SCALE_EXPONENT) + 1)


def _outcome(curves: _Curves, k: int, fmt: Format) -> ScaleOutcome:
    """x * 2^k underflows iff |x| < 2^(flush - k) (ties themselves aside) and is subnormal below 2^(normal - k)."""
    scale = 2.0**k
    under = curves.count_below(flush_exponent(fmt) - k)
    sub = curves.count_below(_normal_exponent(fmt) - k) - under
    nonzero = int(curves.nonzero.sum())
    with np.errstate(over="ignore"):  # amax * 2^k past the double range is inf: an overflow, as it should be
        overflowing = np.flatnonzero(curves.amax * scale >= fmt.overflow_threshold)
    overflowing = overflowing[np.argsort(-curves.amax[overflowing], kind="stable")]  # largest gradient first
    return ScaleOutcome(
        scale=scale,
        overflow=bool(overflowing.size),
        underflow=int(under.sum()) / nonzero if nonzero else 0.0,
        subnormal=int(sub.sum()) / nonzero if nonzero else 0.0,
        overflow_sites=tuple(curves.sites[i].name for i in overflowing),
        worst_underflow_site=_worst_underflow(curves, under),
    )


def _worst_underflow(curves: _Curves, under: np.ndarray) -> str | None:
    """The site losing the largest fraction (ties: the greatest name, so the answer never depends on order)."""
    losing = np.flatnonzero(under)
    if not losing.size:
        return None
    fractions = under[losing] / curves.nonzero[losing]
    return max(curves.sites[i].name for i in losing[fractions == fractions.max()])


def _recommend(curves: _Curves, exponents: np.ndarray, margin_bits: int, fmt: Format) -> float | None:
    """The largest 2^k with amax * 2^(k + margin) below the overflow threshold for every finite site."""
    # amax > 0, not "has non-zero finite values": a step a GradScaler skipped can leave a site all inf,
    # and the bound its skip gives (in amax) still limits the scale.
    finite = curves.amax[np.isfinite(curves.amax) & (curves.amax > 0)]
    if not finite.size:
        return None
    largest = float(finite.max())
    for k in exponents[::-1]:
        with np.errstate(over="ignore"):  # exact, and inf (an overflow) past the double range
            scaled = float(np.ldexp(largest, int(k) + margin_bits))
        if scaled < fmt.overflow_threshold:
            return 2.0 ** int(k)
    return None


def _window(
    curves: _Curves, exponents: np.ndarray, fmt: Format, max_underflow: float
) -> tuple[tuple[float, float] | None, str | None]:
    """Scales with no overflow and little underflow; and the site limiting the low end."""
    outcomes = [_outcome(curves, int(k), fmt) for k in exponents]
    good = [int(k) for k, o in zip(exponents, outcomes) if not o.overflow and o.underflow <= max_underflow]
    no_overflow = [o for o in outcomes if not o.overflow]
    limiter = no_overflow[-1].worst_underflow_site if no_overflow else None
    if not good:
        return None, limiter
    return (2.0 ** min(good), 2.0 ** max(good)), limiter
