"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state).

Each function takes plain data (a Run, the sites to show, analysis results) and returns a Figure; the
caller saves it. Nothing here analyses: what a figure shows is read straight from the Run or its Analysis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from mpdiag.analysis.grad_scaler import GradScalerSimulation
from mpdiag.analysis.overall import Analysis, LossScaling
from mpdiag.core import formats as _formats
from mpdiag.core.formats import Format, flush_exponent
from mpdiag.core.run import Run, Site
from mpdiag.core.sensitivity import Sensitivity
from mpdiag.core.stats import HIST_EXPONENTS, TensorStats

__all__ = [
    "range_chart",
    "exponent_heatmap",
    "over_time",
    "loss_scale_curves",
    "grad_scaler_trajectory",
    "FORMAT_COLOURS",
]

#: One colour per format, the same in every figure.
FORMAT_COLOURS = {
    "fp32": "#555555",
    "tf32": "#8c564b",
    "fp16": "#d62728",
    "bf16": "#1f77b4",
    "fp8_e4m3": "#9467bd",
    "fp8_e5m2": "#2ca02c",
}
_OVERFLOW, _FLUSHED, _SUBNORMAL, _IN_RANGE = "#d62728", "#ff7f0e", "#e6b800", "#4c6a92"
_LABEL_CHARS = 44
_ROW_INCHES = 0.24


def _label(site: Site) -> str:
    text = site.label
    return text if len(text) <= _LABEL_CHARS else "..." + text[-(_LABEL_CHARS - 3) :]


def _percentile_exponents(stats: TensorStats, low: float = 0.01, high: float = 0.99) -> tuple[float, float] | None:
    """log2 bounds holding the central 98% of a site's non-zero finite values (whole power-of-two bins)."""
    total = int(stats.hist.sum())
    if total == 0:
        return None
    cumulative = np.cumsum(stats.hist)
    lo = int(HIST_EXPONENTS[np.searchsorted(cumulative, low * total, side="right")])
    hi = int(HIST_EXPONENTS[min(int(np.searchsorted(cumulative, high * total, side="left")), len(cumulative) - 1)])
    return float(lo), float(hi + 1)


def _format_band(ax, fmt: Format) -> None:  # noqa: ANN001 - matplotlib Axes
    """Shade ``fmt``'s subnormal and normal ranges behind the data and mark where values flush or overflow."""
    ax.axvspan(math.log2(fmt.min_subnormal), math.log2(fmt.min_normal), color=_SUBNORMAL, alpha=0.15, lw=0)
    ax.axvspan(math.log2(fmt.min_normal), math.log2(fmt.max), color="#2ca02c", alpha=0.10, lw=0)
    ax.axvline(math.log2(fmt.overflow_threshold), color=_OVERFLOW, lw=1)
    ax.axvline(flush_exponent(fmt), color=_FLUSHED, lw=1, ls="--")


def _segments(lo: float, hi: float, fmt: Format) -> list[tuple[float, float, str]]:
    """[lo, hi] in log2 cut where ``fmt`` flushes, goes subnormal and overflows, each piece with its colour."""
    cuts = [
        (-math.inf, flush_exponent(fmt), _FLUSHED),
        (flush_exponent(fmt), math.log2(fmt.min_normal), _SUBNORMAL),
        (math.log2(fmt.min_normal), math.log2(fmt.overflow_threshold), _IN_RANGE),
        (math.log2(fmt.overflow_threshold), math.inf, _OVERFLOW),
    ]
    return [(max(lo, a), min(hi, b), colour) for a, b, colour in cuts if max(lo, a) < min(hi, b)]


def range_chart(run: Run, sites: Sequence[Site], formats: Sequence[str], note: str = "") -> Figure:
    """One panel per format, one row per site: a thin line from amin_nonzero to amax, a thick bar over the
    central 98% of values, coloured where the format would flush (orange), go subnormal (yellow) or overflow
    (red); the format's subnormal (yellow) and normal (green) ranges shaded behind."""
    stats = [run.stats(s.name, s.kind) for s in sites]
    fig = Figure(figsize=(3.6 * len(formats) + 3.2, _ROW_INCHES * len(sites) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(formats), sharey=True, squeeze=False)[0]
    ys = np.arange(len(sites))[::-1]
    data = [(math.log2(s.amin_nonzero), math.log2(s.amax)) for s in stats if s.finite_nonzero]
    for ax, name in zip(axes, formats):
        fmt = _formats.get(name)
        _format_band(ax, fmt)
        _draw_ranges(ax, ys, stats, fmt)
        edges = [lo for lo, _ in data] + [hi for _, hi in data] + [math.log2(fmt.min_subnormal), math.log2(fmt.max)]
        ax.set_xlim(min(edges) - 3, max(edges) + 3)
        ax.set_title(name, color=FORMAT_COLOURS.get(name, "black"), fontsize=11)
        ax.set_xlabel("log2 |value|")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, [_label(s) for s in sites], fontsize=8)
    axes[0].set_ylim(-0.8, len(sites) - 0.2)
    fig.legend(
        handles=[
            Patch(color=_IN_RANGE, label="normal"),
            Patch(color=_SUBNORMAL, label="subnormal"),
            Patch(color=_FLUSHED, label="flushes to zero"),
            Patch(color=_OVERFLOW, label="overflows"),
            Line2D([], [], marker="x", color="black", ls="", label="NaN/inf seen"),
        ],
        loc="outside lower center",
        ncols=5,
        fontsize=8,
        frameon=False,
    )
    fig.suptitle("Range of each site against each format" + (f" ({note})" if note else ""), fontsize=11)
    return fig


def _draw_ranges(ax, ys: np.ndarray, stats: Sequence[TensorStats], fmt: Format) -> None:  # noqa: ANN001
    """Every site's range as coloured segments: one LineCollection per width (thousands of Line2D are slow)."""
    thin, thick = [], []
    for y, s in zip(ys, stats):
        if not s.finite_nonzero:
            continue
        lo, hi = math.log2(s.amin_nonzero), math.log2(s.amax)
        thin += [((a, y), (b, y), colour) for a, b, colour in _segments(lo, hi, fmt)]
        central = _percentile_exponents(s)
        if central is not None:
            thick += [
                ((a, y), (b, y), colour) for a, b, colour in _segments(max(central[0], lo), min(central[1], hi), fmt)
            ]
    for segments, width in ((thin, 1.2), (thick, 5.0)):
        if segments:
            ax.add_collection(
                LineCollection(
                    [(p, q) for p, q, _ in segments],
                    colors=[c for _, _, c in segments],
                    linewidths=width,
                    capstyle="butt",
                )
            )
    bad = [y for y, s in zip(ys, stats) if s.nonfinite]
    if bad:  # at the right edge, whatever the x limits turn out to be
        ax.plot(np.ones(len(bad)), bad, "x", color="black", clip_on=False, transform=ax.get_yaxis_transform())


def _exponent_matrix(run: Run, sites: Sequence[Site]) -> np.ndarray:
    """Rows: sites; columns: HIST_EXPONENTS; values: share of the site's non-zero finite values (NaN: none)."""
    rows = []
    for s in sites:
        hist = run.stats(s.name, s.kind).hist.astype(float)
        total = hist.sum()
        rows.append(hist / total if total else np.full(len(hist), np.nan))
    return np.array(rows).reshape(len(sites), len(HIST_EXPONENTS))


def _exponent_window(matrices: Sequence[np.ndarray], formats: Sequence[Format]) -> tuple[int, int]:
    """Column range covering the data, widened to take in format boundaries within 16 bits of it."""
    used = [np.flatnonzero(np.nan_to_num(m).sum(axis=0)) for m in matrices if m.size]
    used = [u for u in used if u.size]
    if not used:
        return 0, len(HIST_EXPONENTS) - 1
    lo = min(int(u[0]) for u in used) - 2
    hi = max(int(u[-1]) for u in used) + 2
    for fmt in formats:
        for edge in (math.log2(fmt.min_subnormal), math.log2(fmt.min_normal), math.log2(fmt.max)):
            column = int(math.floor(edge)) - int(HIST_EXPONENTS[0])
            if lo - 16 <= column < lo:
                lo = column - 1
            if hi < column <= hi + 16:
                hi = column + 1
    return max(lo, 0), min(hi, len(HIST_EXPONENTS) - 1)


def exponent_heatmap(run: Run, panels: Mapping[str, Sequence[Site]], formats: Sequence[str]) -> Figure:
    """Sites by power-of-two bins, colour = share of the site's values in the bin (log scale), one panel
    per group of sites (activations beside gradients), each format's max / min normal / min subnormal drawn."""
    fmts = [_formats.get(f) for f in formats]
    matrices = {title: _exponent_matrix(run, sites) for title, sites in panels.items()}
    lo, hi = _exponent_window(list(matrices.values()), fmts)
    rows = max((len(s) for s in panels.values()), default=1)
    fig = Figure(figsize=(6.0 * len(panels) + 2.5, _ROW_INCHES * max(rows, 8) + 2.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    norm = LogNorm(vmin=1e-6, vmax=1.0)
    image = None
    for ax, (title, sites) in zip(axes, panels.items()):
        matrix = matrices[title][:, lo : hi + 1]
        masked = np.ma.masked_where(~(matrix > 0), matrix)
        extent = (HIST_EXPONENTS[lo], HIST_EXPONENTS[hi] + 1, len(sites) - 0.5, -0.5)
        image = ax.imshow(
            np.clip(masked, 1e-6, 1.0), aspect="auto", interpolation="nearest", cmap="viridis", norm=norm, extent=extent
        )
        for fmt in fmts:
            colour = FORMAT_COLOURS.get(fmt.name, "black")
            for edge, style in ((fmt.max, "-"), (fmt.min_normal, "--"), (fmt.min_subnormal, ":")):
                if extent[0] <= math.log2(edge) <= extent[1]:
                    ax.axvline(math.log2(edge), color=colour, ls=style, lw=1.3)
        ax.set_yticks(range(len(sites)), [_label(s) for s in sites], fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("log2 |value| (bin [2^e, 2^(e+1)))")
        ax.set_facecolor("white")
    if image is not None:
        fig.colorbar(image, ax=axes.tolist(), label="share of the site's non-zero values", shrink=0.8)
    handles = [Line2D([], [], color=FORMAT_COLOURS.get(f.name, "black"), label=f.name) for f in fmts]
    handles += [
        Line2D([], [], color="black", ls=ls, label=what)
        for ls, what in (("-", "max"), ("--", "min normal"), (":", "min subnormal"))
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.suptitle("Where values sit, power of two by power of two", fontsize=11)
    return fig


def over_time(run: Run, sites: Sequence[Site], formats: Sequence[str], analysis: Analysis) -> Figure:
    """Top: per-step amax of ``sites`` with each format's max; bottom: per step, NaN/inf values over all
    sites and values past the overflow threshold of ``analysis.scale_format``."""
    steps = run.steps
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.4))
    for site in sites:  # log2 on a linear axis, like the other figures: any double's range fits
        series = [run.records[s][site].amax if site in run.records[s] else 0.0 for s in steps]
        series = [math.log2(v) if v > 0 else math.nan for v in series]
        top.plot(steps, series, marker="." if len(steps) < 60 else None, lw=1.2, label=_label(site))
    low, high = top.get_ylim()
    for name in formats:
        fmt = _formats.get(name)
        if low - 8 <= math.log2(fmt.max) <= high + 8:  # only the maxima near the data, or the axis loses it
            top.axhline(
                math.log2(fmt.max), color=FORMAT_COLOURS.get(name, "black"), ls="--", lw=1.2, label=f"{name} max"
            )
    top.set_ylabel("log2 of the largest |value| in the step")
    top.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    top.grid(alpha=0.3)
    fmt = _formats.get(analysis.scale_format)
    nonfinite = [analysis.nonfinite_per_step[step] for step in steps]
    overflow = [analysis.overflow_per_step[step] for step in steps]
    width = 0.4 if len(steps) < 200 else 1.0
    bottom.bar(np.array(steps) - width / 2, nonfinite, width=width, color="black", label="NaN/inf values")
    bottom.bar(
        np.array(steps) + width / 2,
        overflow,
        width=width,
        color=_OVERFLOW,
        label=f"values past {fmt.name}'s overflow threshold",
    )
    if any(nonfinite) or any(overflow):
        bottom.set_yscale("symlog", linthresh=1)
    else:
        _nothing(bottom, f"no NaN/inf and nothing past {fmt.name}'s overflow threshold in any step")
    bottom.set_xlabel("step")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_ylabel("count")
    bottom.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle("Over time: the sites closest to overflow, step by step", fontsize=11)
    return fig


def _nothing(ax, text: str) -> None:  # noqa: ANN001
    """An all-zero panel says so in words instead of showing an axis of rounding noise."""
    ax.set_ylim(0, 1)
    ax.set_yticks([0])
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#5b6470", fontsize=9)


def loss_scale_curves(scaling: LossScaling) -> Figure:
    """Underflow share against log2(loss scale): all gradients (thick) and the most demanding sites (thin),
    the overflow wall, the window with at most ``max_underflow`` underflow, and the recommended scale."""
    advice = scaling.advice
    ks = advice.exponents.astype(int)
    overall = scaling.curve
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.subplots()
    for site, curve in scaling.demanding.items():
        ax.plot(ks, [100 * o.underflow for o in curve], lw=0.9, alpha=0.75, label=_label(site))
    ax.plot(ks, [100 * o.underflow for o in overall], color="black", lw=2.5, label="all gradients")
    wall = next((int(k) for k, o in zip(ks, overall) if o.overflow), None)
    if wall is not None:
        ax.axvspan(wall - 0.5, ks[-1] + 0.5, color=_OVERFLOW, alpha=0.12, lw=0)
        ax.axvline(wall - 0.5, color=_OVERFLOW, lw=2, label=f"overflow from 2^{wall}")
    if advice.window is not None:
        low, high = (math.log2(v) for v in advice.window)
        ax.axvspan(
            low - 0.5,
            high + 0.5,
            color="#2ca02c",
            alpha=0.15,
            lw=0,
            label=f"window (underflow <= {100 * advice.max_underflow:g}%)",
        )
    if advice.recommended is not None:
        ax.axvline(
            math.log2(advice.recommended),
            color="#2ca02c",
            ls="--",
            lw=1.5,
            label=f"recommended 2^{int(math.log2(advice.recommended))}",
        )
    ax.set_xlim(*_interesting_scales(ks, overall, wall))
    ax.set_xlabel("log2(loss scale)")
    ax.set_ylabel("gradients flushed to zero (%)")
    ax.set_title(f"Loss scaling in {advice.fmt.name}: underflow against the scale", fontsize=11)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    return fig


def _interesting_scales(ks: np.ndarray, overall: Sequence, wall: int | None) -> tuple[float, float]:
    """From a little below where gradients start to survive to a little past the overflow wall."""
    all_lost = [int(k) for k, o in zip(ks, overall) if o.underflow >= 1.0]
    low = max(all_lost[-1] - 2, int(ks[0])) if all_lost else int(ks[0])
    high = min(wall + 4, int(ks[-1])) if wall is not None else int(ks[-1])
    return low - 0.5, high + 0.5


def grad_scaler_trajectory(
    simulation: GradScalerSimulation, recorded: Mapping[int, float], underflow: Mapping[int, float]
) -> Figure:
    """log2 of the scale a dynamic GradScaler would use at each step, skipped steps marked, the scale the
    run actually recorded beside it (when a GradScaler was attached); below, the share of gradients
    flushed to zero at the simulated scale, step by step."""
    fig = Figure(figsize=(10, 5.2), layout="constrained")
    ax, lost = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    steps_lost = sorted(underflow)
    lost.bar(
        steps_lost,
        [100 * underflow[s] for s in steps_lost],
        width=0.8 if len(steps_lost) < 200 else 1.0,
        color=_FLUSHED,
    )
    lost.set_ylabel("flushed (%)")
    if not any(underflow.values()):
        _nothing(lost, "no gradient flushed to zero at the simulated scale")
    lost.set_xlabel("step")
    lost.xaxis.set_major_locator(MaxNLocator(integer=True))
    lost.grid(alpha=0.3)
    steps = np.array(simulation.steps)
    log_scales = np.log2(simulation.scales)
    ax.step(steps, log_scales, where="post", color="black", lw=1.5, label="simulated GradScaler")
    skipped = np.array(simulation.skipped, dtype=bool)
    if skipped.any():
        ax.plot(
            steps[skipped],
            log_scales[skipped],
            "x",
            color=_OVERFLOW,
            ms=7,
            label=f"skipped step ({int(skipped.sum())})",
        )
    if recorded:
        rec_steps = sorted(recorded)
        ax.plot(
            rec_steps,
            np.log2([recorded[s] for s in rec_steps]),
            "o",
            color="#1f77b4",
            ms=3,
            alpha=0.7,
            label="recorded scale",
        )
    shown = list(log_scales) + ([math.log2(v) for v in recorded.values()] if recorded else [])
    ax.set_ylim(math.floor(min(shown)) - 1, math.ceil(max(shown)) + 1)  # whole powers of two, even when flat
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("log2(loss scale)")
    title = f"GradScaler replay in {simulation.fmt.name}"
    ax.set_title(title + (" (approximate: not every step recorded)" if simulation.approximate else ""), fontsize=11)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    return fig


#: Where a non-finite error is drawn on the SQNR axis (below every finite value shown).
_NONFINITE_DB = -10.0


def sensitivity_chart(sens: Sensitivity, kept: Sequence[str] = ()) -> Figure:
    """SQNR of each leaf module's output, in forward order: local (the module alone in low precision on
    its fp32 inputs) and propagated (the whole model under autocast); non-finite as crosses at the bottom,
    the modules ``kept`` in fp32 shaded."""
    names = [n for n in sens.leaves if n in sens.local or n in sens.propagated]
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.subplots()
    if not names:
        _nothing(ax, "no leaf module was measured")
        return fig
    xs = np.arange(len(names))
    measured = [e.sqnr_db for errors in (sens.local, sens.propagated) for e in errors.values()]
    finite = [v for v in measured if math.isfinite(v)]
    exact_db = (max(finite) if finite else 0.0) + 15  # where outputs equal to fp32's (inf dB) are drawn
    for errors, label, color, marker, shift in (
        (sens.local, "local: the module alone", "#1f77b4", "o", -0.12),
        (sens.propagated, "propagated: whole model under autocast", "#ff7f0e", "s", 0.12),
    ):
        db = [errors[n].sqnr_db if n in errors else math.nan for n in names]
        ax.plot(xs, [min(v, exact_db) if v > -math.inf else math.nan for v in db], lw=1.2, ms=4, label=label,
                color=color, marker=marker)  # fmt: skip
        bad = [x for x, n in zip(xs, names) if n in errors and errors[n].nonfinite]
        if bad:
            ax.plot([x + shift for x in bad], [_NONFINITE_DB] * len(bad), "x", color=color, ms=9, mew=2)
    ax.axhline(exact_db, color="grey", lw=0.8, ls=":")
    ax.text(len(names) - 0.5, exact_db, "exact (equal to fp32)", ha="right", va="bottom", fontsize=7, color="grey")
    for i, n in enumerate(names):
        if n in kept:
            ax.axvspan(i - 0.5, i + 0.5, color="#2ca02c", alpha=0.2, lw=0)
    ax.axhline(_NONFINITE_DB, color=_OVERFLOW, lw=0.8, ls=":")
    ax.set_xticks(xs, [_short(n) for n in names], rotation=90, fontsize=6 if len(names) > 40 else 8)
    ax.set_ylabel("SQNR (dB; x: non-finite)")
    ax.set_title(f"Precision sensitivity in {sens.dtype}: signal to rounding noise per layer", fontsize=11)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return fig


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]
