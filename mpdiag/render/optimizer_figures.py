"""The report's figures of the optimizer's updates: the |update| / |weight| ratio against each format's
rounding, and the shares of updates lost, step by step. Plain data in (a run's ``UpdatesAnalysis``), a
matplotlib Figure out, as in ``mpdiag.render.figures``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from mpdiag.analysis.updates import UpdatesAnalysis
from mpdiag.core.updates import RATIO_BINS, RATIO_LOW
from mpdiag.render.figures import FORMAT_COLOURS

__all__ = ["update_ratio_heatmap", "lost_over_time"]

_ROW_INCHES = 0.24
_LABEL_CHARS = 40


def _normalised(rows: np.ndarray) -> np.ndarray:
    """Each row as shares of its total (NaN for a row that counted nothing)."""
    totals = rows.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, rows / np.maximum(totals, 1), np.nan)


def _window(matrices: Sequence[np.ndarray], lines: Sequence[int]) -> tuple[int, int]:
    """The bins holding data, widened by 2 and to take in each format's line."""
    used = np.flatnonzero(sum(np.nan_to_num(m).sum(axis=0) for m in matrices))
    lo = int(used[0]) - 2 if used.size else 0
    hi = int(used[-1]) + 2 if used.size else RATIO_BINS - 1
    for line in lines:
        lo, hi = min(lo, line - RATIO_LOW - 1), max(hi, line - RATIO_LOW + 1)
    return max(lo, 0), min(hi, RATIO_BINS - 1)


def update_ratio_heatmap(updates: UpdatesAnalysis, params: Sequence[str]) -> Figure:
    """log2(|update| / |weight|) per power of two: left, every parameter together, step by step; right,
    ``params`` over every recorded step. Colour: the share of the changed elements (with a non-zero
    weight) in each bin. Each format's solid line: below it an update always rounds away with the weight
    stored in that format (in its normal range); dotted: above it, it never does; between the two, it
    depends on where the weight lies in its binade."""
    steps = sorted(updates.ratio_per_step)
    by_step = np.array([updates.ratio_per_step[s] for s in steps], float).reshape(len(steps), RATIO_BINS)
    by_param = np.array([updates.merged[p].ratio_counts for p in params], float).reshape(len(params), RATIO_BINS)
    lines = dict(updates.always_lost_log2)
    lo, hi = _window([by_step, by_param], [*lines.values(), *updates.never_lost_log2.values()])
    fig = Figure(figsize=(13.0, _ROW_INCHES * max(len(params), 14) + 2.2), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(1.0, 1.2))
    norm = LogNorm(vmin=1e-4, vmax=1.0)
    y0, y1 = RATIO_LOW + lo, RATIO_LOW + hi + 1
    image = None
    for ax, matrix, extent in (
        (left, _normalised(by_step).T, (-0.5, len(steps) - 0.5, y0, y1)),
        (right, _normalised(by_param).T, (-0.5, len(params) - 0.5, y0, y1)),
    ):
        window = matrix[lo : hi + 1]
        masked = np.ma.masked_where(~(window > 0), window)
        image = ax.imshow(
            np.clip(masked, 1e-4, 1.0),
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            norm=norm,
            extent=extent,
            origin="lower",
        )
        for name, line in lines.items():
            colour = FORMAT_COLOURS.get(name, "black")
            ax.axhline(line, color=colour, lw=1.4)
            ax.axhline(updates.never_lost_log2[name], color=colour, lw=1.0, ls=":")
        ax.set_ylabel("log2 (|update| / |weight|), bin [2^e, 2^(e+1))")
        ax.set_facecolor("white")
    left.set_title("all parameters, step by step", fontsize=10)
    left.set_xlabel("recorded step")
    tick_steps = range(0, len(steps), max(1, len(steps) // 12))
    left.set_xticks(list(tick_steps), [str(steps[i]) for i in tick_steps], fontsize=8)
    right.set_title(f"the {len(params)} most affected parameters, all recorded steps", fontsize=10)
    labels = [p if len(p) <= _LABEL_CHARS else "..." + p[-(_LABEL_CHARS - 3) :] for p in params]
    right.set_xticks(range(len(params)), labels, rotation=90, fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=[left, right], label="share of the changed elements", shrink=0.8)
    handles = [Line2D([], [], color=FORMAT_COLOURS.get(n, "black"), label=f"{n}: always lost below") for n in lines]
    handles.append(Line2D([], [], color="black", ls=":", label="never lost above"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.suptitle("How large each update is against its weight, against each format's rounding", fontsize=11)
    return fig


def lost_over_time(updates: UpdatesAnalysis) -> Figure:
    """Per recorded step, over every parameter: the share of the changes each format would round away
    with the weights stored in it (solid), the share of non-zero gradients the weights' own low-precision
    dtype lost (dashed, black), and the share of elements where Adam's eps dominated (right)."""
    with_eps = bool(updates.eps_per_step)
    fig = Figure(figsize=(12.0 if with_eps else 8.5, 4.2), layout="constrained")
    axes = fig.subplots(1, 2 if with_eps else 1, squeeze=False)[0]
    ax = axes[0]
    for name, per_step in updates.stalled_per_step.items():
        steps = sorted(per_step)
        ax.plot(steps, [100 * per_step[s] for s in steps], marker=".", color=FORMAT_COLOURS.get(name), label=name)
    for dtype, per_step in updates.lost_per_step.items():
        if any(per_step.values()):
            steps = sorted(per_step)
            shares = [100 * per_step[s] for s in steps]
            ax.plot(steps, shares, marker=".", ls="--", color="black", label=f"{dtype} lost")
    ax.set_ylim(-3, 103)
    ax.set_ylabel("% lost (formats: of the changes; dtype: of the non-zero gradients)", fontsize=8)
    ax.set_title("updates lost with the weights stored in each format", fontsize=10)
    if with_eps:
        steps = sorted(updates.eps_per_step)
        axes[1].plot(steps, [100 * updates.eps_per_step[s] for s in steps], marker=".", color="#444444")
        axes[1].set_ylim(-3, 103)
        axes[1].set_ylabel("% of elements")
        axes[1].set_title("where Adam's eps dominated the denominator", fontsize=10)
    for a in axes:
        a.set_xlabel("step")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle("The optimizer's updates, step by step", fontsize=11)
    return fig
