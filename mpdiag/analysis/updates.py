"""What the optimizer's steps did to the weights, judged: updates a narrower weight format would round
away, updates a low-precision weight really lost, and Adam's eps drowning the second moment.

All of it reads ``run.update_stats`` (recorded with ``diagnose(..., optimizer=opt)``), merged over the
recorded steps, and is plain data for the verdicts, the report and the summary.

- Stalled: with fp32 master weights, how many of each parameter's changes a weight stored in a format
  would have lost (the stored weight plus the update rounds back to the stored weight). For a weight in
  the format's normal range, an update below ``always_lost_log2(fmt)`` of the weight is always lost: the
  stored weight lies in [2^e, 2^(e+1)) with half-spacings of 2^(e - mantissa bits - 1) above and, at a
  power of two, half that below, while the weight itself may lie up to a half-spacing from the stored
  one; an update of at least ``never_lost_log2(fmt)`` of the weight never is. In between, it depends on
  where the weight lies in its binade. Below the normal range the spacing is absolute, and larger.
- Lost: for weights stored in a low-precision dtype, the elements with a non-zero gradient that the
  step left unchanged (pure bf16 training silently stops learning there).
- eps: where Adam's eps exceeds the root of the bias-corrected second moment, the step there is the
  first moment scaled by lr/eps: SGD with momentum, not Adam.

Examples:
    >>> from mpdiag.core import formats
    >>> always_lost_log2(formats.get("bf16")), never_lost_log2(formats.get("bf16"))
    (-10, -7)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mpdiag.core import formats as _formats
from mpdiag.core.formats import Format
from mpdiag.core.run import Run
from mpdiag.core.text import percent
from mpdiag.core.updates import WEIGHT_BITS_AT_LEAST, UpdateStats

__all__ = [
    "ParamShares",
    "UpdatesAnalysis",
    "UpdateRow",
    "analyse_updates",
    "eps_sentence",
    "always_lost_log2",
    "never_lost_log2",
    "TOLERATED_STALL",
    "EPS_DOMINATES",
]

#: A parameter is called out when a format would lose (or its dtype lost) more than this share of its
#: changes: a percent of a step's updates rounded away is learning the model does not get.
TOLERATED_STALL = 0.01
#: Weight dtypes whose own losses rank no parameter (``UpdatesAnalysis.ranked``).
_WIDE_DTYPES = ("float32", "float64")
#: A parameter is called out when eps dominates the denominator in more than this share of its
#: elements: most of it then trains as SGD with momentum.
EPS_DOMINATES = 0.5


@dataclass(frozen=True)
class ParamShares:
    """One per-parameter share of the optimizer's updates, over the parameters that have it.

    Attributes:
        what: what is counted ("stalled in bf16", "lost in bfloat16", "eps dominated").
        shares: parameter -> its share, merged over the recorded steps, largest first.
        called_out: the parameters whose share exceeds ``threshold``, largest first.
        threshold: the share above which a parameter is called out.
        overall: the share over all the parameters' elements together.
    """

    what: str
    shares: tuple[tuple[str, float], ...]
    called_out: tuple[str, ...]
    threshold: float
    overall: float

    @property
    def worst(self) -> tuple[str, float]:
        """The parameter with the largest share, and that share."""
        return self.shares[0]


def always_lost_log2(fmt: Format) -> int:
    """log2 of the |update| / |weight| ratio below which a weight stored in ``fmt`` (in its normal
    range) always rounds the update away: an eighth of the format's eps (from ``torch.finfo``)."""
    return round(math.log2(fmt.eps)) - 3


def never_lost_log2(fmt: Format) -> int:
    """log2 of the |update| / |weight| ratio from which a weight stored in ``fmt`` (in its normal range)
    never rounds the update away: the format's eps."""
    return round(math.log2(fmt.eps))


@dataclass(frozen=True)
class UpdateRow:
    """One parameter's shares over the recorded steps, as the summary and the report tabulate them.

    Attributes:
        param, dtype: the parameter and the dtype its weight is stored in.
        changed: the share of its elements the steps changed.
        stalled: per format of ``UpdatesAnalysis.stalled``, the share of those changes a weight stored in
            it would lose; None where it is not counted (not narrower than the weight) or nothing changed.
        lost: the share of its non-zero gradients its own dtype lost (None without a gradient).
        eps: the share of its elements where Adam's eps dominated (None without one).
    """

    param: str
    dtype: str
    changed: float
    stalled: tuple[float | None, ...]
    lost: float | None
    eps: float | None

    @classmethod
    def of(cls, update: UpdateStats, formats: Sequence[str]) -> UpdateRow:
        return cls(
            param=update.param,
            dtype=update.dtype,
            changed=update.nonzero / update.numel if update.numel else 0.0,
            stalled=tuple(update.stalled_share(f) if f in update.stalled and update.nonzero else None for f in formats),
            lost=update.lost_share,
            eps=update.eps_share,
        )


@dataclass(frozen=True)
class UpdatesAnalysis:
    """The optimizer's updates over a run, judged (``analyse_updates``).

    Attributes:
        stalled: format -> how many of each parameter's changes a weight stored in it would lose, for the
            parameters stored wider (formats with no such parameter are absent).
        lost: weight dtype ("bfloat16") -> what the parameters stored in it really lost.
        eps: where Adam's eps dominated the denominator; None for optimizers without one.
        always_lost_log2, never_lost_log2: format -> log2 of the |update| / |weight| below which it always
            loses the update, and from which it never does (weights in its normal range), for the formats
            a weight is stored in (WEIGHT_BITS_AT_LEAST bits or more).
        stalled_per_step, lost_per_step: the same shares over all parameters together, per recorded step.
        eps_per_step: the eps-dominated share over all parameters' elements, per recorded step.
        ratio_per_step: the |update| / |weight| histogram over all parameters (``ratio_counts``) per step.
        sentence: eps's verdict in words (``eps_sentence``), or None when eps dominates nowhere.
        ranked: every updated parameter, the most affected first: by the share its own dtype lost (a
            16-bit weight's), then by the share the first tracked format narrower than it would lose.
        merged: parameter -> its updates over every recorded step (``run.update_stats(name)``).
        rows: the ``ranked`` parameters' shares, in that order (``UpdateRow``).
    """

    stalled: Mapping[str, ParamShares]
    lost: Mapping[str, ParamShares]
    eps: ParamShares | None
    always_lost_log2: Mapping[str, int]
    never_lost_log2: Mapping[str, int]
    stalled_per_step: Mapping[str, Mapping[int, float]]
    lost_per_step: Mapping[str, Mapping[int, float]]
    eps_per_step: Mapping[int, float]
    ratio_per_step: Mapping[int, tuple[int, ...]]
    sentence: str | None
    ranked: tuple[str, ...]
    merged: Mapping[str, UpdateStats]
    rows: tuple[UpdateRow, ...]


def analyse_updates(run: Run) -> UpdatesAnalysis | None:
    """Judge the updates ``run`` recorded (None when it recorded none: no ``optimizer=``, or
    ``updates=False``).

    Examples:
        >>> import torch, mpdiag
        >>> layer = torch.nn.Linear(4, 4)
        >>> opt = torch.optim.Adam(layer.parameters(), lr=1e-5)
        >>> with mpdiag.diagnose(layer, optimizer=opt, formats=("bf16",)) as diag:
        ...     layer(torch.randn(2, 4)).sum().backward()
        ...     opt.step()
        >>> result = analyse_updates(diag.run)
        >>> result.always_lost_log2["bf16"], result.stalled["bf16"].worst[1]  # lr 1e-5: all lost in bf16
        (-10, 1.0)
    """
    if not run.updates:
        return None
    merged = {name: run.update_stats(name) for name in run.updated_params}
    formats = [_formats.get(f) for f in run.formats]
    dtypes = sorted({u.dtype for u in merged.values()})
    stalled = {f.name: v for f in formats if (v := _stalled(merged, f.name)) is not None}
    lost = {d: v for d in dtypes if (v := _lost(merged, d)) is not None}
    eps = _eps(merged)
    steps = sorted(run.updates)
    ranked = tuple(sorted(merged, key=lambda n: _affected(merged[n], run.formats)))
    stored_in = [f for f in formats if f.dtype is not None and f.bits >= WEIGHT_BITS_AT_LEAST]
    return UpdatesAnalysis(
        stalled=stalled,
        lost=lost,
        eps=eps,
        always_lost_log2={f.name: always_lost_log2(f) for f in stored_in},
        never_lost_log2={f.name: never_lost_log2(f) for f in stored_in},
        stalled_per_step={f: {s: _overall(_stalled(run.updates[s], f)) for s in steps} for f in stalled},
        lost_per_step={d: {s: _overall(_lost(run.updates[s], d)) for s in steps} for d in lost},
        eps_per_step={s: _overall(_eps(run.updates[s])) for s in steps} if eps is not None else {},
        ratio_per_step={s: tuple(map(sum, zip(*(u.ratio_counts for u in run.updates[s].values())))) for s in steps},
        sentence=eps_sentence(eps),
        ranked=ranked,
        merged=merged,
        rows=tuple(UpdateRow.of(merged[n], list(stalled)) for n in ranked),
    )


def _affected(update: UpdateStats, formats: tuple[str, ...]) -> tuple[float, float, str]:
    """The sort key of ``ranked``: the most affected parameter sorts first. What an fp32 or fp64 weight
    itself loses is rounding noise beside what a 16-bit format would: for those, the stalled share."""
    first = next((f for f in formats if f in update.stalled), None)
    stalled = update.stalled_share(first) if first is not None else 0.0
    lost = (update.lost_share or 0.0) if update.dtype not in _WIDE_DTYPES else 0.0
    return -lost, -stalled, update.param


def eps_sentence(eps: ParamShares | None) -> str | None:
    """Where eps dominated Adam's denominator, in words; None when it dominated no parameter's elements."""
    if eps is None or not eps.called_out:
        return None
    worst, share = eps.worst
    return (
        f"Adam's eps dominates the denominator in {percent(share)} of {worst}'s elements ({len(eps.called_out)} of "
        f"{len(eps.shares)} parameters over {percent(eps.threshold)}; {percent(eps.overall)} of all elements): "
        f"there the root of the bias-corrected second moment is below eps, and the step is the first moment "
        f"times lr/eps, SGD with momentum rather than Adam. A smaller eps, or gradients scaled up, restores "
        f"Adam's per-element step sizes."
    )


def _stalled(updates: Mapping[str, UpdateStats], fmt: str) -> ParamShares | None:
    counts = {n: (u.stalled[fmt], u.nonzero) for n, u in updates.items() if fmt in u.stalled}
    return _shares(f"stalled in {fmt}", counts, TOLERATED_STALL)


def _lost(updates: Mapping[str, UpdateStats], dtype: str) -> ParamShares | None:
    counts = {
        n: (u.lost, u.grad_nonzero)
        for n, u in updates.items()
        if u.dtype == dtype and u.lost is not None and u.grad_nonzero is not None
    }
    return _shares(f"lost in {dtype}", counts, TOLERATED_STALL)


def _eps(updates: Mapping[str, UpdateStats]) -> ParamShares | None:
    counts = {
        n: (u.eps_dominated, u.eps_numel)
        for n, u in updates.items()
        if u.eps_dominated is not None and u.eps_numel is not None
    }
    return _shares("eps dominated", counts, EPS_DOMINATES)


def _overall(shares: ParamShares | None) -> float:
    return shares.overall if shares is not None else 0.0


def _shares(what: str, counts: dict[str, tuple[int, int]], threshold: float) -> ParamShares | None:
    """``counts``: parameter -> (counted, out of)."""
    if not counts:
        return None
    ranked = sorted(((n, c / d if d else 0.0) for n, (c, d) in counts.items()), key=lambda pair: (-pair[1], pair[0]))
    total = sum(d for _, d in counts.values())
    return ParamShares(
        what=what,
        shares=tuple(ranked),
        called_out=tuple(n for n, s in ranked if s > threshold),
        threshold=threshold,
        overall=sum(c for c, _ in counts.values()) / total if total else 0.0,
    )
