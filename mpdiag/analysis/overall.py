"""The analysis of a run: every fact the report and the terminal summary show, computed once.

``analyse(run)`` runs this package's analyses on a run (the verdicts, the loss-scale advice, a GradScaler
replayed on it, the riskiest sites, per-step counts) and returns their results as one frozen ``Analysis``.
Renderers format its facts and compute none, so the page and the summary cannot disagree. What several
analyses need (the steps the run's GradScaler skipped, every site's risk per format) is computed once here
and passed on.

Examples:
    >>> import torch, mpdiag
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 1, bias=False))
    >>> _ = torch.nn.init.constant_(model[0].weight, 1.0)
    >>> with mpdiag.diagnose(model, formats=("fp16", "bf16")) as diag:
    ...     model(torch.full((1, 3), 3e4)).sum().backward()  # 9e4: past fp16's max only
    >>> result = mpdiag.analyse(diag.run)
    >>> [(v.fmt, str(v.level)) for v in result.verdicts], result.notes
    ([('fp16', 'fail'), ('bf16', 'ok')], ())
    >>> result.overflow_per_step  # the one value, seen by the Sequential and by its layer
    {0: 2}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mpdiag.analysis.grad_scaler import APPROXIMATE, GradScalerSimulation, recorded_settings, simulate_run_scaler
from mpdiag.analysis.gradients import gradient_sites, scaler_overflows, underflow_per_step
from mpdiag.analysis.riskiest import SiteRisk, closest_to_max, model_sites, riskiest
from mpdiag.analysis.scaling import LossScaleAdvice, ScaleOutcome, advise
from mpdiag.analysis.updates import UpdatesAnalysis, analyse_updates
from mpdiag.analysis.verdict import Verdict, nonfinite_verdict, skips_verdict, verdict
from mpdiag.core import formats as _formats
from mpdiag.core.errors import MpdiagError
from mpdiag.core.run import Run, Site
from mpdiag.core.stats import TensorStats

__all__ = ["Analysis", "LossScaling", "analyse", "DEMANDING_SITES"]

#: Gradient sites, the most demanding first, whose own loss-scale curves are kept (the report draws them).
DEMANDING_SITES = 8


@dataclass(frozen=True)
class LossScaling:
    """Loss scaling in the scale format: the advice, its underflow curves and a GradScaler replayed on the run.

    Attributes:
        advice: ``advise(run, fmt)``.
        curve: the outcome of every replayed scale for all gradient sites together, ascending.
        demanding: the ``DEMANDING_SITES`` gradient sites that need the largest scale, most demanding
            first, each with its own curve.
        simulation: a dynamic GradScaler replayed on the run, with the run's own GradScaler settings where
            they were recorded (else torch's defaults).
        own_settings: whether the replay used the run's own GradScaler settings.
        flushed: step -> the share of its true gradients flushed to zero at the simulated scale.
        advice_text: the advice in words (``str(advice)``, which evaluates outcomes: computed here).
    """

    advice: LossScaleAdvice
    curve: tuple[ScaleOutcome, ...]
    demanding: Mapping[Site, tuple[ScaleOutcome, ...]]
    simulation: GradScalerSimulation
    own_settings: bool
    flushed: Mapping[int, float]
    advice_text: str


@dataclass(frozen=True)
class Analysis:
    """Every fact the report and the terminal summary show about one run. See ``analyse``.

    Attributes:
        scale_format: the format loss scaling is replayed for.
        verdicts: the verdict per tracked format, in the run's order.
        nonfinite: where NaN/inf of the model's own appeared (``nonfinite_verdict``), or None.
        skips: what the run's GradScaler skipped (``skips_verdict``), or None.
        scaler_skips: the steps it skipped, each with the smallest true gradient that implies
            (``scaler_overflows``).
        advice: format name -> loss-scale advice; empty when no gradient was recorded.
        riskiest: format name -> every site's risk in that format, riskiest first (``riskiest``).
        model_riskiest: the same without the optimizer's state and updates (``model_sites``): the
            values the model computes with, which the summary and the figures rank.
        closest_to_max: every model site, ordered by how near its largest value comes to the first format's
            max (NaN/inf, then overflow, first).
        nonfinite_per_step: step -> NaN/inf values over all sites.
        overflow_per_step: step -> values past the scale format's overflow threshold over all sites.
        scaling: loss scaling in the scale format; None when no gradient was recorded.
        updates: the optimizer's updates judged (``analyse_updates``); None when none were recorded.
        notes: what the analysis could only approximate, worded for a person (a GradScaler replayed on a
            run that did not record every step).
    """

    scale_format: str
    verdicts: tuple[Verdict, ...]
    nonfinite: str | None
    skips: str | None
    scaler_skips: Mapping[int, float]
    advice: Mapping[str, LossScaleAdvice]
    riskiest: Mapping[str, tuple[SiteRisk, ...]]
    model_riskiest: Mapping[str, tuple[SiteRisk, ...]]
    closest_to_max: tuple[Site, ...]
    nonfinite_per_step: Mapping[int, int]
    overflow_per_step: Mapping[int, int]
    scaling: LossScaling | None
    notes: tuple[str, ...]
    updates: UpdatesAnalysis | None = None


def analyse(run: Run, *, scale_format: str | None = None) -> Analysis:
    """Analyse ``run`` once for every renderer: ``mpdiag.report`` and the terminal summary format the result.

    Args:
        run: a recorded run (``diag.run`` or ``mpdiag.load(path)``).
        scale_format: the format loss scaling is replayed for (default fp16 when tracked, else the first).

    Examples:
        >>> import torch, mpdiag
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> with mpdiag.diagnose(model, formats=("bf16",)) as diag:
        ...     model(torch.randn(2, 4)).sum().backward()
        >>> result = mpdiag.analyse(diag.run)
        >>> result.scale_format, result.scaling.simulation.steps
        ('bf16', (0,))
    """
    if not isinstance(run, Run):
        raise MpdiagError(f"analyse() expects an mpdiag Run (diag.run or mpdiag.load(path)), got {type(run).__name__}")
    if not run.steps:
        raise MpdiagError("the run has no recorded steps; train at least one step with diagnose() attached")
    name = _scale_format(run, scale_format)
    skips = scaler_overflows(run)  # the advice, the replay and the verdicts all ask
    advice = {f: advise(run, f, scaler_skips=skips) for f in run.formats} if gradient_sites(run) else {}
    ranked = {f: tuple(riskiest(run, f, n=len(run.sites))) for f in run.formats}
    scaling = _loss_scaling(run, advice[name], skips) if advice else None
    updates = analyse_updates(run)
    return Analysis(
        scale_format=name,
        verdicts=tuple(
            verdict(run, _formats.get(f), advice.get(f), ranked=ranked[f], scaler_skips=skips, updates=updates)
            for f in run.formats
        ),
        nonfinite=nonfinite_verdict(run, scaler_skips=skips),
        skips=skips_verdict(run, scaler_skips=skips),
        scaler_skips=skips,
        advice=advice,
        riskiest=ranked,
        model_riskiest={f: tuple(model_sites(r)) for f, r in ranked.items()},
        closest_to_max=tuple(closest_to_max(model_sites(ranked[run.formats[0]]))),
        nonfinite_per_step=_per_step(run, lambda v: v.nonfinite),
        overflow_per_step=_per_step(run, lambda v: v.overflow(name)),
        scaling=scaling,
        notes=(APPROXIMATE,) if scaling is not None and scaling.simulation.approximate else (),
        updates=updates,
    )


def _scale_format(run: Run, requested: str | None) -> str:
    if requested is None:
        return "fp16" if "fp16" in run.formats else run.formats[0]
    name = _formats.get(requested).name
    if name not in run.formats:
        raise MpdiagError(
            f"scale_format {name!r} was not tracked in this run; tracked formats are {', '.join(run.formats)}"
        )
    return name


def _loss_scaling(run: Run, advice: LossScaleAdvice, skips: Mapping[int, float]) -> LossScaling:
    simulation = simulate_run_scaler(run, advice.fmt, skips)
    return LossScaling(
        advice=advice,
        curve=tuple(advice.curve()),
        demanding={site: tuple(advice.curve(site)) for site in advice.most_demanding(DEMANDING_SITES)},
        simulation=simulation,
        own_settings=bool(recorded_settings(run)),
        flushed=underflow_per_step(run, advice.fmt, dict(zip(simulation.steps, simulation.scales))),
        advice_text=str(advice),
    )


def _per_step(run: Run, count: Callable[[TensorStats], int]) -> dict[int, int]:
    """``count`` summed over the sites of each step. Only sites whose merged statistics count any can count
    any in a step: a large run has a thousand sites and few of those."""
    counting = [site for site in run.sites if count(run.stats(site.name, site.kind))]
    return {
        step: sum(count(run.records[step][site]) for site in counting if site in run.records[step])
        for step in run.steps
    }
