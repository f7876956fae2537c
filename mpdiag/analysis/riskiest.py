"""The riskiest sites per format: plain rows for the terminal summary, the report's figures and its table.

For each tracked format a site's risk is, in order: it held NaN/inf; values would overflow; and then
the nearer of its two edges in bits: headroom (its largest value below the format's max) or footroom
(its smallest non-zero value above the format's smallest normal; negative once values go subnormal).

Examples:
    >>> import torch, mpdiag
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    >>> with mpdiag.diagnose(model) as diag:
    ...     (model(torch.randn(2, 4) * 1e5).sum()).backward()
    >>> riskiest(diag.run, "fp16", n=1)[0].overflow > 0
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mpdiag.core import formats as _formats
from mpdiag.core.formats import Format
from mpdiag.core.run import Kind, Run, Site

__all__ = ["SiteRisk", "riskiest", "model_sites", "closest_to_max", "headroom_bits", "footroom_bits"]


@dataclass(frozen=True)
class SiteRisk:
    """One site against one format, over the chosen steps."""

    name: str
    kind: Kind
    amax: float
    headroom_bits: float  # log2(max / amax): negative past max, inf for an all-zero site
    footroom_bits: float  # log2(amin_nonzero / min_normal): negative for subnormal values, inf if none
    underflow: float  # fraction of non-zero finite values flushed to zero
    overflow: int  # values at or past the overflow threshold
    nonfinite: int  # NaN and inf values already there
    subnormal: float  # fraction of non-zero finite values left subnormal
    overflow_share: float  # fraction of finite values at or past the overflow threshold

    @property
    def site(self) -> Site:
        return Site(self.name, self.kind)

    def key(self) -> tuple[bool, bool, float, float]:
        return (self.nonfinite == 0, self.overflow == 0, min(self.headroom_bits, self.footroom_bits), -self.underflow)


def headroom_bits(amax: float, fmt: Format) -> float:
    """Bits between ``amax`` and the format's largest value (negative when amax is past it)."""
    return math.inf if amax == 0 else math.log2(fmt.max / amax)


def footroom_bits(amin_nonzero: float, fmt: Format) -> float:
    """Bits between the format's smallest normal and ``amin_nonzero`` (negative for subnormal values;
    inf when there is no non-zero value)."""
    return math.log2(amin_nonzero / fmt.min_normal) if math.isfinite(amin_nonzero) else math.inf


def riskiest(run: Run, fmt: str | Format, n: int = 8, step: int | None = None) -> list[SiteRisk]:
    """The ``n`` riskiest sites for ``fmt`` (merged over steps, or at ``step``)."""
    fmt = _formats.get(fmt)
    rows = []
    for site in run.sites if step is None else list(run.records.get(step, {})):
        s = run.stats(site.name, site.kind, step)
        finite_nonzero = max(s.finite_nonzero, 1)
        rows.append(
            SiteRisk(
                site.name,
                site.kind,
                s.amax,
                headroom_bits(s.amax, fmt),
                footroom_bits(s.amin_nonzero, fmt),
                s.underflow(fmt) / finite_nonzero,
                s.overflow(fmt),
                s.nonfinite,
                s.subnormal(fmt) / finite_nonzero,
                s.overflow(fmt) / max(s.finite, 1),
            )
        )
    return sorted(rows, key=SiteRisk.key)[:n]


def model_sites(risks: Sequence[SiteRisk]) -> list[SiteRisk]:
    """``risks`` without the optimizer's state and updates: the values the model computes with. The
    summary's and the figures' riskiest are these (Adam's squared gradients sit far below fp16's range
    in every parameter and would crowd out the model's sites); the verdict's optimizer clause judges the
    state on its own, and the report's table lists every site."""
    return [r for r in risks if not r.site.kind.is_optimizer]


def closest_to_max(risks: Sequence[SiteRisk]) -> list[Site]:
    """The sites of ``risks`` ordered by how near their largest value comes to max (NaN/inf, overflow first)."""
    return [r.site for r in sorted(risks, key=lambda r: (r.nonfinite == 0, r.overflow == 0, r.headroom_bits))]
