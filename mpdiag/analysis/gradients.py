"""True gradients: the recorded gradients divided by each step's loss scale, and the steps a GradScaler skipped.

Under a GradScaler the hooks see scaled gradients. Every analysis of gradients (the loss-scale advice, the
GradScaler replay, the verdicts) starts from the same unscaled view, step by step: which sites hold
gradients, their statistics divided by the step's scale (exact: the scales are powers of two), and which
steps the run's own scaler skipped because its scaled gradients overflowed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from mpdiag.core import formats as _formats
from mpdiag.core.errors import MpdiagError
from mpdiag.core.formats import Format, flush_exponent
from mpdiag.core.run import Kind, Run, Site
from mpdiag.core.stats import HIST_EXPONENTS, TensorStats

__all__ = [
    "GRADIENT_KINDS",
    "gradient_sites",
    "true_gradient_steps",
    "true_stats",
    "exponent_of",
    "scaler_overflows",
    "skips_within",
    "underflow_per_step",
    "flushed_per_step",
]

GRADIENT_KINDS = (Kind.ACTIVATION_GRAD, Kind.PARAM_GRAD)


def gradient_sites(run: Run) -> list[Site]:
    return [s for s in run.sites if s.kind in GRADIENT_KINDS]


def true_gradient_steps(run: Run, steps: Iterable[int] | None = None) -> list[int]:
    chosen = run.steps if steps is None else sorted(set(steps))
    missing = sorted(set(chosen) - set(run.steps))
    if missing:
        raise MpdiagError(f"steps {missing} were not recorded; recorded steps: {run.steps}")
    if not chosen:
        raise MpdiagError("the run has no recorded steps; train at least one step with diagnose() attached")
    return chosen


def true_stats(run: Run, site: Site, step: int) -> TensorStats:
    """The site's statistics at ``step`` divided by that step's loss scale (exact for powers of two)."""
    stats = run.records[step][site]
    scale = run.loss_scale(step)
    if scale == 1.0:
        return stats
    return stats.rescaled(exponent_of(scale, what="a recorded loss scale"))


def exponent_of(scale: float, what: str = "a loss scale") -> int:
    mantissa, exponent = math.frexp(scale)
    if scale <= 0 or mantissa != 0.5 or not math.isfinite(scale):
        raise MpdiagError(f"expected {what} that is a power of two (2.0**k), got {scale!r}")
    return exponent - 1


def scaler_overflows(run: Run, steps: Iterable[int] | None = None) -> dict[int, float]:
    """The recorded steps a GradScaler skipped because its scaled gradients overflowed, each with the
    smallest true |gradient| that overflow implies: the overflow threshold of the narrowest dtype the
    step's gradients were held in, divided by the step's loss scale.

    A step counts when it was recorded at a loss scale above 1, only gradients held NaN/inf (activations
    and parameters were finite: the forward was fine) and so the scaler found inf and skipped it, as it
    is designed to. NaN/inf anywhere else, or without scaling, are the model's own.

    NB: the narrowest dtype, not the dtype of the sites that held inf: under autocast an fp32 parameter's
    gradient is reduced in fp16 (and overflows there) before it is cast to fp32.
    """
    out: dict[int, float] = {}
    ever_held = [site for site in run.sites if run.stats(site.name, site.kind).nonfinite]  # merged: cached
    if not ever_held or not run.loss_scales:
        return out
    for step in run.steps if steps is None else steps:
        scale = run.loss_scale(step)
        records = run.records[step]
        held = [site for site in ever_held if site in records and records[site].nonfinite]
        if scale <= 1.0 or not held or any(site.kind not in GRADIENT_KINDS for site in held):
            continue
        dtypes = {d for site, stats in records.items() if site.kind in GRADIENT_KINDS for d in stats.dtypes}
        threshold = min(_formats.get(d).overflow_threshold for d in dtypes & _SCALED_DTYPES | {"float32"})
        out[step] = threshold / scale
    return out


_SCALED_DTYPES = {"float16", "bfloat16", "float32"}  # gradient dtypes a GradScaler's overflow can happen in


def skips_within(run: Run, steps: Iterable[int], scaler_skips: Mapping[int, float] | None) -> dict[int, float]:
    """``scaler_overflows(run, steps)``, taken from ``scaler_skips`` (all of the run's, in step order) where
    the caller computed them already: whether a step overflowed depends on that step alone."""
    if scaler_skips is None:
        return scaler_overflows(run, steps)
    wanted = set(steps)
    return {step: bound for step, bound in scaler_skips.items() if step in wanted}


def underflow_per_step(run: Run, fmt: str | torch.dtype | Format, scales: Mapping[int, float]) -> dict[int, float]:
    """For each step in ``scales``, the share of its non-zero finite true gradients that ``fmt`` would flush
    to zero at that step's loss scale (a power of two), e.g. the scales a simulated GradScaler chose."""
    return {
        step: flushed / nonzero if nonzero else 0.0
        for step, (flushed, nonzero) in flushed_per_step(run, fmt, scales).items()
    }


def flushed_per_step(
    run: Run, fmt: str | torch.dtype | Format, scales: Mapping[int, float]
) -> dict[int, tuple[int, int]]:
    """For each step in ``scales``: (true gradients ``fmt`` flushes to zero at that step's scale, non-zero
    finite true gradients). Whole log2 bins, so exact but for values exactly on the flush tie."""
    fmt = _formats.get(fmt)
    sites = gradient_sites(run)
    out = {}
    for step, scale in scales.items():
        hists = [true_stats(run, site, step).hist for site in sites if site in run.records[step]]
        hist = np.sum(hists, axis=0) if hists else np.zeros(len(HIST_EXPONENTS), dtype=np.int64)
        flushed = hist[HIST_EXPONENTS < flush_exponent(fmt) - exponent_of(scale)].sum()
        out[step] = (int(flushed), int(hist.sum()))
    return out
