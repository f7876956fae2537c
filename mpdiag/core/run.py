"""Run: what a diagnosis recorded, as plain data independent of the model.

A Run maps each recorded step to the statistics of every site seen in it. It holds no tensors and no
reference to the model, so it can be kept, compared, saved and analysed after training has moved on.

Examples:
    >>> import torch, mpdiag
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    >>> with mpdiag.diagnose(model) as diag:
    ...     model(torch.randn(2, 4)).sum().backward()
    ...     diag.step()
    >>> run = diag.run
    >>> run.steps
    [0]
    >>> run.stats("0", "activation").numel
    6
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from mpdiag.core.errors import MpdiagError, UnknownSiteError
from mpdiag.core.events import PHASES, AnomalyRecord, NonFiniteEvent, order
from mpdiag.core.sites import Kind, Site
from mpdiag.core.stats import TensorStats
from mpdiag.core.updates import UpdateStats

__all__ = ["Run", "step_ranges"]


@dataclass(frozen=True)
class Run:
    """Statistics per recorded step and site.

    Attributes:
        formats: names of the tracked formats.
        records: step index -> site -> statistics of that site in that step.
        meta: facts about the recording, JSON-compatible values: ``every``, ``environment``, and
            ``tied_parameters``, the names of each parameter that the model holds under several (see ``stats``).
        loss_scales: the loss scale a GradScaler applied in each recorded step (``diagnose(scaler=...)``);
            steps without an entry were not scaled. Recorded gradients are the scaled ones.
        events: the non-finite events of each recorded step that had any (see ``nonfinite_events``).
        anomalies: what torch's anomaly mode reported while attached (message, forward traceback, module).
        updates: step -> parameter name -> what the optimizer's step did to it (``update_stats``); recorded
            when ``diagnose`` is given the optimizer, with ``updates=True``.
    """

    formats: tuple[str, ...]
    records: Mapping[int, Mapping[Site, TensorStats]] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    loss_scales: Mapping[int, float] = field(default_factory=dict)
    events: Mapping[int, tuple[NonFiniteEvent, ...]] = field(default_factory=dict)
    anomalies: tuple[AnomalyRecord, ...] = ()
    updates: Mapping[int, Mapping[str, UpdateStats]] = field(default_factory=dict)

    def nonfinite_events(self) -> list[NonFiniteEvent]:
        """Every observation that held NaN or inf, step by step, forward before backward, in execution order."""
        return order([e for step in sorted(self.events) for e in self.events[step]])

    def first_nonfinite(self, step: int | None = None, phase: str | None = None) -> NonFiniteEvent | None:
        """Where non-finite values first appeared: in ``step`` (default: the first step that had any), in
        ``phase`` ("forward" or "backward"; default whichever came first: forward). None if nowhere."""
        if phase is not None and phase not in PHASES:
            raise MpdiagError(f"phase must be one of {', '.join(PHASES)} or None, got {phase!r}")
        if step is not None and step not in self.records:
            raise MpdiagError(f"step {step} was not recorded; recorded steps: {step_ranges(self.steps)}")
        candidates = [
            e
            for e in self.nonfinite_events()
            if (step is None or e.step == step) and (phase is None or e.phase == phase)
        ]
        return candidates[0] if candidates else None

    def loss_scale(self, step: int) -> float:
        """The loss scale of ``step`` (1.0 where no GradScaler was recorded)."""
        return float(self.loss_scales.get(step, 1.0))

    @property
    def steps(self) -> list[int]:
        """Recorded step indices, in order."""
        return sorted(self.records)

    @property
    def sites(self) -> list[Site]:
        """Every site recorded in any step, in the order first seen."""
        return list(self._merged)

    @cached_property
    def _merged(self) -> dict[Site, TensorStats]:
        # Every site merged over all steps, computed once: a report of 1,000 sites x 100 steps asks for
        # each site several times. A Run is immutable, so the cache never goes stale.
        per_site: dict[Site, list[TensorStats]] = {}
        for step in self.steps:
            for site, stats in self.records[step].items():
                per_site.setdefault(site, []).append(stats)
        return {site: TensorStats.merge_all(items) for site, items in per_site.items()}

    def stats(self, name: str, kind: str | Kind, step: int | None = None) -> TensorStats:
        """Statistics of one site at ``step``, or merged over all recorded steps when step is None.

        A parameter held under several names (tied weights: GPT-2's ``lm_head.weight`` is its
        ``transformer.wte.weight``) is one tensor with one gradient. It is recorded once, under the first
        of its names in the modules observed, and ``sites`` and ``table`` list it there; ``stats`` answers
        to each of its names with those statistics, since they are the statistics of the tensor asked for.

        Raises:
            UnknownSiteError: the site was never recorded (the message names close matches, in any case,
                and the parameter a name is tied to).
            MpdiagError: ``step`` was not recorded, or the site was not seen in it.
        """
        site = self._recorded_as(Site(name, Kind.parse(kind)))
        if site not in self._merged:
            raise UnknownSiteError(self._unknown_site_message(site))
        if step is None:
            return self._merged[site]
        if step not in self.records:
            raise MpdiagError(f"step {step} was not recorded; recorded steps: {step_ranges(self.steps)}")
        if site not in self.records[step]:
            seen_at = [s for s in self.steps if site in self.records[s]]
            raise MpdiagError(
                f"site {name!r} ({site.kind}) was not seen in step {step}; seen in steps {step_ranges(seen_at)}"
            )
        return self.records[step][site]

    @cached_property
    def _updated(self) -> dict[str, list[int]]:
        """Parameter -> the steps its update was recorded in (computed once: ``update_stats`` asks per call)."""
        steps: dict[str, list[int]] = {}
        for step in sorted(self.updates):
            for name in self.updates[step]:
                steps.setdefault(name, []).append(step)
        return steps

    @property
    def updated_params(self) -> list[str]:
        """The parameters whose updates were recorded (``update_stats``), in the order first seen."""
        return list(self._updated)

    def update_stats(self, param: str, step: int | None = None) -> UpdateStats:
        """What the optimizer's step did to ``param`` at ``step``, or summed over every recorded step
        when step is None: elements changed, updates narrower formats would lose, what the weight's own
        dtype lost, the |update| / |weight| histogram, Adam's eps share (``mpdiag.core.updates``).

        Raises:
            UnknownSiteError: no update of ``param`` was recorded (the message names close matches).
            MpdiagError: ``step`` was not recorded, or ``param`` was not updated in it.
        """
        name = next((n for n in self._tied_names(param) if n in self._updated), param)
        per_step = {s: self.updates[s][name] for s in self._updated.get(name, [])}
        if not self.updates:
            raise UnknownSiteError(
                f"no update of {param!r}: this run recorded no updates; diagnose records them when given the "
                f"optimizer (diagnose(model, optimizer=opt), with updates=True, the default), in the recorded "
                f"steps the optimizer took (not those a GradScaler skipped)"
            )
        if not per_step and any(Site(n, Kind.PARAM) in self._merged for n in self._tied_names(param)):
            raise UnknownSiteError(
                f"no update of {param!r} was recorded, though the parameter was: the optimizer given to "
                f"diagnose does not step it (it is frozen, requires_grad=False, or another optimizer's)"
            )
        if not per_step:
            raise UnknownSiteError(self._unknown_site_message(Site(param, Kind.UPDATE)))
        if step is None:
            return UpdateStats.merge_all(per_step.values())
        if step not in self.records:
            raise MpdiagError(f"step {step} was not recorded; recorded steps: {step_ranges(self.steps)}")
        if step not in per_step:
            raise MpdiagError(
                f"{param!r} received no recorded update in step {step}; updated in steps {step_ranges(list(per_step))}"
            )
        return per_step[step]

    def table(self, step: int | None = None) -> list[dict[str, Any]]:
        """One flat dict per site (name, kind and every statistic), ready for ``pandas.DataFrame``."""
        sites = self.sites if step is None else list(self.records.get(step, {}))
        if step is not None and step not in self.records:
            raise MpdiagError(f"step {step} was not recorded; recorded steps: {step_ranges(self.steps)}")
        return [{"name": s.name, "kind": s.kind.value, **self.stats(s.name, s.kind, step).as_dict()} for s in sites]

    def _tied_names(self, name: str) -> list[str]:
        """Every name of the parameter called ``name`` (``[name]`` for a parameter held under one)."""
        return next((list(group) for group in self.meta.get("tied_parameters", ()) if name in group), [name])

    def _aliases(self, site: Site) -> list[Site]:
        """``site`` under every name of its parameter, where it is a parameter's: its value, gradient and
        update, or a state tensor ``<parameter>.<key>`` of it."""
        if site.kind in (Kind.PARAM, Kind.PARAM_GRAD, Kind.UPDATE):
            return [Site(n, site.kind) for n in self._tied_names(site.name)]
        if site.kind == Kind.OPTIMIZER_STATE and "." in site.name:
            param, key = site.name.rsplit(".", 1)
            return [Site(f"{n}.{key}", site.kind) for n in self._tied_names(param)]
        return [site]

    def _recorded_as(self, site: Site) -> Site:
        """The site that holds ``site``'s statistics: itself, or the tied parameter's recorded name."""
        if site in self._merged:
            return site
        return next((alias for alias in self._aliases(site) if alias in self._merged), site)

    def _unknown_site_message(self, site: Site) -> str:
        recorded = [s for s in self.sites if s.kind == site.kind]
        names = {alias.name for s in recorded for alias in self._aliases(s)}  # every name of a tied parameter
        by_lower: dict[str, list[str]] = {}
        for n in sorted(names):
            by_lower.setdefault(n.lower(), []).append(n)
        close = [
            n
            for c in difflib.get_close_matches(site.name.lower(), list(by_lower), n=3, cutoff=0.5)
            for n in by_lower[c]
        ]
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        kinds = sorted({s.kind.value for s in self.sites if s.name == site.name})
        if kinds:
            hint = f"; {site.name!r} was recorded as {', '.join(kinds)}"
        others = [alias.name for alias in self._aliases(site) if alias.name != site.name]
        if others:
            hint = (
                f"; {site.name!r} is tied to {', '.join(map(repr, others))} (one tensor, recorded once, under "
                f"the first of its names), and none of them has {_a(site.kind.value)} {site.kind} site"
            )
        return f"no {site.kind} site named {site.name!r} in this run{hint}"

    def __repr__(self) -> str:
        return f"Run(steps={step_ranges(self.steps)}, sites={len(self.sites)}, formats={self.formats})"


def _a(word: str) -> str:
    """The indefinite article of ``word``: 'an update', 'a param'."""
    return "an" if word[:1] in "aeiou" else "a"


def step_ranges(steps: list[int]) -> str:
    """Compact text for a list of step indices: '0-9, 20, 30-31'."""
    if not steps:
        return "none"
    parts: list[str] = []
    start: float = steps[0]  # step indices, and the math.inf that closes the last range
    prev: float = steps[0]
    for s in steps[1:] + [math.inf]:
        if s != prev + 1:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = s
        prev = s
    return ", ".join(parts)
