"""Plain-text renderings for an 80-column terminal (the CLI prints them; nothing here prints)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

from mpdiag.analysis.overall import Analysis, analyse
from mpdiag.analysis.riskiest import SiteRisk
from mpdiag.analysis.updates import UpdatesAnalysis
from mpdiag.core.run import Run
from mpdiag.core.text import display_name

__all__ = ["summary", "table"]

_NAME_WIDTH = 26


def table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Columns sized to their content; the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines)


def _site(risk: SiteRisk) -> str:
    name = f"{display_name(risk.name)} {risk.kind.value.replace('activation', 'act').replace('param', 'prm')}"
    return name if len(name) <= _NAME_WIDTH else "..." + name[-(_NAME_WIDTH - 3) :]


def _bits(value: float) -> str:
    return "-" if math.isinf(value) else f"{value:+.1f}"


def summary(run: Run, n: int = 6, *, analysis: Analysis | None = None) -> str:
    """The verdict per format, then its riskiest sites: headroom to max in bits, underflow %, overflow,
    non-finite. Every line fits an 80-column terminal.

    ``analysis``: ``mpdiag.analyse(run)`` where already computed (the report can format the same one);
    analysed here when None.
    """
    if analysis is None:
        analysis = analyse(run)
    parts = [f"{len(run.steps)} recorded step(s), {len(run.sites)} sites.", ""]
    for v in analysis.verdicts:
        parts.append(
            textwrap.fill(v.sentence, width=80, initial_indent=f"{v.level.upper():5} ", subsequent_indent=" " * 6)
        )
    parts += [
        "",
        f"The {n} riskiest sites per format. head: bits from the largest value to the",
        "format's max; foot: bits from the smallest non-zero value to its smallest normal",
        "(negative: past max / subnormal).",
    ]
    if run.loss_scales:
        parts.append(
            "Gradients are shown as recorded, scaled by the run's GradScaler; the verdicts above judge them unscaled."
        )
    for fmt in run.formats:
        rows = [
            (
                _site(r),
                f"{r.amax:.3g}",
                _bits(r.headroom_bits),
                _bits(r.footroom_bits),
                f"{100 * r.underflow:.2f}",
                str(r.overflow),
                str(r.nonfinite),
            )
            for r in analysis.model_riskiest[fmt][:n]
        ]
        parts.append(f"\n{fmt}\n" + table(("site", "amax", "head", "foot", "under%", "over", "nan/inf"), rows))
    if analysis.updates is not None:
        parts.append(_updates_table(analysis.updates, n))
    eps = analysis.updates.sentence if analysis.updates is not None else None
    for text in (analysis.nonfinite, analysis.skips, eps):
        if text is not None:
            parts.append("\n" + textwrap.fill(text, width=80))
    for note in analysis.notes:
        parts.append("\n" + textwrap.fill(f"NB: {note}", width=80))
    return "\n".join(parts)


def _updates_table(updates: UpdatesAnalysis, n: int) -> str:
    """The ``n`` most affected parameters: the share of elements the steps changed, of those changes each
    format would lose with the weight stored in it, of the non-zero gradients the weight's own dtype
    lost, and of elements where Adam's eps dominated."""
    formats = list(updates.stalled)
    eps = updates.eps is not None
    header = ("parameter", "changed", *formats, "lost", *(["eps"] if eps else []))
    # The name takes what the share columns (at most "100.0", or their title) leave of 80 columns.
    width = 80 - sum(max(len(h), len("100.0")) + 2 for h in header[1:])
    rows = []
    for row in updates.rows[:n]:
        shares = [row.changed, *row.stalled, row.lost, *([row.eps] if eps else [])]
        label = row.param if len(row.param) <= width else "..." + row.param[-(width - 3) :]
        rows.append((label, *map(_percent, shares)))
    intro = (
        f"Updates, the {min(n, len(updates.ranked))} most affected of {len(updates.ranked)} parameters (% over "
        "the recorded steps): elements changed; of those changes, what each format would round away with the "
        "weight stored in it; of the non-zero gradients, what the weight's own dtype lost"
        + ("; elements where Adam's eps dominated." if eps else ".")
    )
    return "\n" + textwrap.fill(intro, width=80) + "\n" + table(header, rows)


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}"  # None: not counted, or no change to lose
