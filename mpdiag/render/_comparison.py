"""Assembling a comparison's page: a Comparison and each precision's verdicts in, figures written, the
page out. Each precision's own report (written beside it by ``mpdiag.report``) is linked, not repeated."""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpdiag.analysis.verdict import Level, Verdict
from mpdiag.core.comparison import Comparison, Convergence, PrecisionResult, speed_ratio
from mpdiag.core.text import byte_size, duration, percent, signed_percent
from mpdiag.core.version import __version__
from mpdiag.render import comparison_figures as fig
from mpdiag.render._build import save_figure
from mpdiag.render.page import EmbeddedFigure, render_page

__all__ = ["Part", "build_comparison", "FIGURES"]

FIGURES = ("loss_curves", "cost")

_COLUMNS = ("precision", "final loss", "vs fp32", "steps outside the band", "left it for good at",
            "distance / band at the end", "parameter distance", "median step (spread)", "speed vs fp32",
            "peak memory", "memory vs fp32", "skipped steps")  # fmt: skip


@dataclass(frozen=True)
class Part:
    """One precision's own report, as the comparison page links it: its verdicts and where it is."""

    precision: str
    verdicts: Sequence[Verdict]
    href: str | None


def build_comparison(cmp: Comparison, out: Path, *, title: str, parts: Sequence[Part]) -> tuple[str, dict[str, Path]]:
    """Write the comparison's figures into ``out``; return (page, figure files)."""
    saved: dict[str, EmbeddedFigure] = {}
    band = f"RMS over {cmp.noise.window} steps of {cmp.noise.how}"
    saved["loss_curves"] = save_figure(
        out,
        "loss_curves",
        fig.loss_curves(cmp),
        f"Training loss per step of every precision; shaded: fp32's loss +- its noise band ({band}). Below: "
        "each precision's distance to fp32 in units of the band (within +-1: within noise).",
        "",
    )
    saved["cost"] = save_figure(
        out,
        "cost",
        fig.cost_bars(cmp),
        f"Median step time ({cmp.timing}) and peak memory per precision, labelled with the ratio to fp32.",
        "",
    )
    context: dict[str, Any] = {
        "title": title,
        "overview": str(cmp).splitlines()[0],
        "lines": [_line(cmp, p) for p in cmp.results],
        "figures": saved,
        "table": {"columns": _COLUMNS, "rows": [_row(cmp, r) for r in cmp.results.values()]},
        "parts": parts,
        "method": _method(cmp),
        "version": __version__,
        "generated": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }
    return render_page("comparison.html.j2", **context), {name: out / f.file for name, f in saved.items()}


def _line(cmp: Comparison, precision: str) -> dict[str, str]:
    result = cmp.results[precision]
    text = cmp.line(precision).split(": ", 1)[1]
    return {"precision": precision, "text": text, "level": _level(result)}


def _level(result: PrecisionResult) -> str:
    judged = result.convergence
    if judged is None:
        return Level.OK.value
    if judged.diverged_at is not None:
        return Level.FAIL.value
    return Level.OK.value if judged.within_noise else Level.WARN.value


def _row(cmp: Comparison, result: PrecisionResult) -> list[str]:
    ref, judged = cmp.reference, result.convergence
    return [
        result.precision,
        f"{result.final_loss:.5g}",
        _final(judged) if judged else "-",
        percent(judged.outside_share) if judged else "-",
        ("never" if judged.first_outside is None else f"step {judged.first_outside}") if judged else "-",
        f"{judged.final_ratio_to_noise:.2f}" if judged else "-",
        f"{judged.param_distance:.3g}" if judged else _yardstick_distance(cmp),
        f"{duration(result.step_time)} ({percent(result.step_time_spread)})"
        if math.isfinite(result.step_time_spread)
        else duration(result.step_time),
        _times(speed_ratio(ref, result)),
        byte_size(result.peak_memory),
        _times(result.peak_memory / ref.peak_memory if ref.peak_memory > 0 else math.nan),
        ", ".join(map(str, result.skipped_steps)) or "none",
    ]


def _yardstick_distance(cmp: Comparison) -> str:
    distance = cmp.noise.param_distance
    return "-" if distance is None else f"(reordered fp32: {distance:.3g})"


def _final(judged: Convergence) -> str:
    if math.isfinite(judged.final_change):
        return signed_percent(judged.final_change)
    return f"{judged.final_difference:+.4g} (absolute)"


def _times(ratio: float) -> str:
    return f"{ratio:.2f}x" if math.isfinite(ratio) else "-"


def _method(cmp: Comparison) -> list[tuple[str, str]]:
    rows = [
        ("device", cmp.device),
        ("steps per precision", str(cmp.steps)),
        ("noise band", f"{cmp.noise.how}, RMS over a trailing window of {cmp.noise.window} steps"),
        ("step time", cmp.timing),
        ("peak memory", cmp.memory),
    ]
    notes: Mapping[str, Any] = {p: r.notes for p, r in cmp.results.items() if r.notes}
    rows += [(f"{p}", "; ".join(n)) for p, n in notes.items()]
    return rows
