"""The report's site table as plain rows: one per site, every cell with its text, sort key and risk class.

Kept apart from the HTML so a test can check the numbers without parsing markup, and so the sort keys
(numbers, with inf where a site has no value) are decided in Python rather than re-parsed in the browser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mpdiag.analysis.overall import Analysis
from mpdiag.analysis.riskiest import SiteRisk
from mpdiag.core.run import Run, Site
from mpdiag.core.stats import TensorStats
from mpdiag.core.text import display_name, percent

__all__ = ["Cell", "Column", "Risk", "site_rows", "columns"]

#: How a cell is highlighted (its CSS class): not at all, as marginal, or as values lost.
Risk = Literal["", "warn", "bad"]

#: Headroom below this many bits is highlighted as marginal.
MARGINAL_BITS = 2.0
#: Underflow shares above this are highlighted.
VISIBLE_UNDERFLOW = 1e-3


@dataclass(frozen=True)
class Column:
    title: str
    group: str  # "" for site columns, else the format name
    numeric: bool
    tip: str


@dataclass(frozen=True)
class Cell:
    text: str
    key: float | str  # what the column sorts by
    risk: Risk = ""


def columns(formats: Sequence[str]) -> list[Column]:
    cols = [
        Column("site", "", False, "module or parameter name"),
        Column("kind", "", False, "what was observed"),
        Column("dtype", "", False, "dtypes the observed tensors had"),
        Column("amax", "", True, "largest finite |value|"),
        Column("amin≠0", "", True, "smallest non-zero finite |value|"),
        Column("NaN/inf", "", True, "non-finite values seen"),
    ]
    for name in formats:
        cols += [
            Column("head", name, True, f"bits from amax to {name}'s max (negative: past it)"),
            Column("foot", name, True, f"bits from amin≠0 to {name}'s smallest normal (negative: subnormal)"),
            Column("under%", name, True, f"share of non-zero values {name} flushes to zero"),
            Column("subn%", name, True, f"share of non-zero values left subnormal in {name}"),
            Column("over%", name, True, f"share of finite values at or past {name}'s overflow threshold"),
        ]
    return cols


def site_rows(run: Run, analysis: Analysis, sites: Sequence[Site] | None = None) -> list[list[Cell]]:
    """One row of cells per site (merged over steps), in the order of ``columns``: the site's own
    statistics from ``run``, its risk in each format from ``analysis``."""
    risks = {name: {r.site: r for r in analysis.riskiest[name]} for name in run.formats}
    return [
        _row(site, run.stats(site.name, site.kind), [risks[name][site] for name in run.formats])
        for site in (sites or run.sites)
    ]


def _row(site: Site, s: TensorStats, risks: Sequence[SiteRisk]) -> list[Cell]:
    cells = [
        Cell(display_name(site.name), site.name),
        Cell(site.kind.value, site.kind.value),
        Cell(", ".join(sorted(s.dtypes)) or "-", ",".join(sorted(s.dtypes))),
        _number(s.amax if s.finite_nonzero else math.nan),
        _number(s.amin_nonzero if s.finite_nonzero else math.nan),
        Cell(str(s.nonfinite), s.nonfinite, "bad" if s.nonfinite else ""),
    ]
    for r in risks:  # a site without non-zero values has inf head- and footroom: shown as "-"
        cells += [
            _bits(r.headroom_bits, bad_below=0.0),
            _bits(r.footroom_bits, bad_below=-math.inf),
            _share(r.underflow, "warn" if r.underflow > VISIBLE_UNDERFLOW else ""),
            _share(r.subnormal, "warn" if r.subnormal > VISIBLE_UNDERFLOW else ""),
            _share(r.overflow_share, "bad" if r.overflow_share else ""),
        ]
    return cells


def _number(value: float) -> Cell:
    if math.isnan(value):
        return Cell("-", -1.0)
    return Cell(f"{value:.4g}", value)


def _bits(value: float, bad_below: float) -> Cell:
    if math.isinf(value):
        return Cell("-", value)
    risk: Risk = "bad" if value < bad_below else "warn" if value < MARGINAL_BITS else ""
    return Cell(f"{value:+.1f}", value, risk)


def _share(value: float, risk: Risk) -> Cell:
    return Cell(percent(value), value, risk)
