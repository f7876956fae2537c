"""The comparison page's figures: loss curves against fp32's noise band, and step time and peak memory.

Like ``figures``: plain data in (a Comparison), a matplotlib Figure out, nothing computed but what is drawn.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from mpdiag.core.comparison import REFERENCE, Comparison
from mpdiag.render.figures import FORMAT_COLOURS

__all__ = ["loss_curves", "cost_bars", "PRECISION_COLOURS"]

#: One colour per precision; bf16-pure is bf16's colour, dashed in the curves.
PRECISION_COLOURS = {**FORMAT_COLOURS, "bf16-pure": FORMAT_COLOURS["bf16"]}


def loss_curves(cmp: Comparison) -> Figure:
    """Every precision's loss per step over fp32's, with fp32 +- the noise band shaded; below, each
    precision's distance to fp32 in units of the band."""
    fig = Figure(figsize=(9, 6.2), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    steps = np.arange(cmp.steps)
    ref = np.array(cmp.reference.losses)
    band = np.array(cmp.noise.band)
    top.fill_between(steps, ref - band, ref + band, color="#bbbbbb", alpha=0.5, lw=0, label="fp32 +- noise band")
    for precision, result in cmp.results.items():
        style = "--" if precision == "bf16-pure" else "-"
        colour = PRECISION_COLOURS.get(precision, "#000000")
        top.plot(steps, result.losses, style, color=colour, lw=1.4 if precision == REFERENCE else 1.1, label=precision)
        if result.convergence is not None:
            # NaN where the band is 0 (step 0): not drawn; beyond +-20 bands the curve is cut
            ratio = np.clip(np.array(result.convergence.difference, dtype=float), -20, 20)
            bottom.plot(steps, ratio, style, color=colour, lw=1.1, label=precision)
        for step in result.skipped_steps:
            top.axvline(step, color=colour, lw=0.6, alpha=0.35)
    if cmp.noise.losses is not None:
        top.plot(steps, cmp.noise.losses, ":", color="#777777", lw=1, label="fp32, batches reordered")
    top.set_ylabel("training loss")
    top.legend(fontsize=8, ncols=2)
    top.set_title("Loss per step from the same weights and batches (vertical lines: steps the GradScaler skipped)")
    bottom.axhspan(-1, 1, color="#bbbbbb", alpha=0.5, lw=0)
    bottom.axhline(0, color=PRECISION_COLOURS[REFERENCE], lw=1)
    bottom.set_ylabel("(loss - fp32) / band")
    bottom.set_xlabel("step")
    if any(r.convergence is not None for r in cmp.results.values()):
        bottom.legend(fontsize=8, ncols=4)
    return fig


def cost_bars(cmp: Comparison) -> Figure:
    """Median step time and peak memory per precision, each bar labelled with its ratio to fp32."""
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    time_ax, memory_ax = fig.subplots(1, 2)
    names = list(cmp.results)
    colours = [PRECISION_COLOURS.get(p, "#000000") for p in names]
    ref = cmp.reference
    _bars(time_ax, names, [1e3 * cmp.results[p].step_time for p in names], colours, 1e3 * ref.step_time)
    time_ax.set_title("median step time (ms); labels: time vs fp32")
    _bars(memory_ax, names, [cmp.results[p].peak_memory / 2**20 for p in names], colours, ref.peak_memory / 2**20)
    memory_ax.set_title("peak memory (MiB); labels: memory vs fp32")
    return fig


def _bars(ax, names: list[str], values: list[float], colours: list[str], reference: float) -> None:  # noqa: ANN001
    shown = [v if math.isfinite(v) else 0.0 for v in values]
    bars = ax.bar(names, shown, color=colours)
    for bar, value in zip(bars, values):
        text = f"{value / reference:.2f}x" if reference > 0 and math.isfinite(value) else "-"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.margins(y=0.15)
    ax.tick_params(axis="x", labelsize=8)
