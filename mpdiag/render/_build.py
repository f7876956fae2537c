"""Assembling the report: a Run and its Analysis in, figures written, the page's context out."""

from __future__ import annotations

import datetime
import io
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from mpdiag.analysis.overall import Analysis
from mpdiag.core.events import NonFiniteOrigin
from mpdiag.core.run import Kind, Run, Site, step_ranges
from mpdiag.core.sensitivity import Sensitivity
from mpdiag.core.version import __version__
from mpdiag.render import figures as fig
from mpdiag.render import optimizer_figures
from mpdiag.render.page import EmbeddedFigure, render_page
from mpdiag.render.table import columns, site_rows

#: Sites drawn in the over-time figure.
_LINES = 8
#: NaN/inf observations listed on the page (all of them are in the run).
_EVENTS_SHOWN = 200
_DPI = 100
#: Every figure a report can have; a run without gradients has no loss-scaling figures, for example.
FIGURES = (
    "ranges",
    "exponents_activations",
    "exponents_parameters",
    "over_time",
    "loss_scale",
    "grad_scaler",
    "sensitivity",
    "optimizer_state",
    "update_ratios",
    "updates_over_time",
)
#: Parameters in the update-ratio figure and the updates table.
_UPDATED_SHOWN = 24


def build(
    run: Run,
    analysis: Analysis,
    out: Path,
    *,
    top: int,
    origin: NonFiniteOrigin | None,
    title: str,
    sensitivity: Sensitivity | None = None,
) -> tuple[str, dict[str, Path]]:
    """Write the figures of ``run`` and its ``analysis`` into ``out`` as PNG files; return (page, figure files)."""
    ranked = [r.site for r in analysis.model_riskiest[run.formats[0]]]  # the first format's, riskiest first
    saved: dict[str, EmbeddedFigure] = {}

    def save(name: str, figure: Figure, caption: str, note: str = "") -> EmbeddedFigure:
        saved[name] = save_figure(out, name, figure, caption, note)
        return saved[name]

    sites, note = chosen(run, ranked, top)
    save(
        "ranges",
        fig.range_chart(run, sites, run.formats, note),
        "Each site from its smallest to its largest non-zero value (thin) and its central 98% (thick), "
        "against the normal (green) and subnormal (yellow) range of each format.",
        note,
    )
    heatmaps = [save(name, figure, caption, note) for name, figure, caption, note in _heatmaps(run, ranked, top)]
    lines, _ = chosen(run, analysis.closest_to_max, _LINES)
    save(
        "over_time",
        fig.over_time(run, lines, run.formats, analysis),
        f"Largest value per step of the {len(lines)} sites closest to {run.formats[0]}'s max (NaN/inf first), "
        f"and per-step counts of NaN/inf values and of values past {analysis.scale_format}'s overflow threshold.",
    )
    scaling = _scaling_section(run, analysis, save)
    optimizer = _optimizer_section(run, analysis, top, save)
    precision = _sensitivity_section(sensitivity, save)
    context = dict(
        title=title,
        overview=_overview(run),
        verdicts=analysis.verdicts,
        nonfinite_text=analysis.nonfinite,
        skips_text=analysis.skips,
        environment=environment_rows(run.meta),
        figures=saved,
        heatmaps=heatmaps,
        scaling=scaling,
        optimizer=optimizer,
        eps_text=analysis.updates.sentence if analysis.updates is not None else None,
        nonfinite=_nonfinite_section(run, origin),
        sensitivity=precision,
        **_table_context(run, analysis),
        version=__version__,
        generated=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    )
    for stale in set(FIGURES) - set(saved):  # from an earlier report in the same directory: not this run's
        (out / f"{stale}.png").unlink(missing_ok=True)
    return render_page(**context), {name: out / f.file for name, f in saved.items()}


def chosen(run: Run, ranked: Sequence[Site], n: int, kinds: Sequence[Kind] | None = None) -> tuple[list[Site], str]:
    """The ``n`` riskiest sites (of ``kinds``) in the run's own order, and a note when some were left out."""
    pool = [s for s in ranked if kinds is None or s.kind in kinds]
    keep = set(pool[:n])
    note = f"the {n} riskiest of {len(pool)} sites; the table lists all" if len(pool) > n else ""
    return [s for s in run.sites if s in keep], note


def environment_rows(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The run's environment as (key, text) rows, nested settings flattened to 'grad_scaler.init_scale'."""
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            rows.append((prefix, _text(value)))

    walk("", meta.get("environment") or {})
    if "every" in meta:
        rows.append(("recorded every", f"{meta['every']} step(s)"))
    return rows


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, float) and value > 0 and math.isfinite(value) and math.log2(value).is_integer():
        return f"{value:g} (2^{int(math.log2(value))})"
    return str(value)


def _overview(run: Run) -> str:
    return (
        f"{len(run.steps)} recorded step(s) ({step_ranges(run.steps)}), {len(run.sites)} sites, "
        f"formats {', '.join(run.formats)}"
    )


def save_figure(out: Path, name: str, figure: Figure, caption: str, note: str) -> EmbeddedFigure:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    png = buffer.getvalue()
    (out / f"{name}.png").write_bytes(png)
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk: the image's real size
    return EmbeddedFigure(
        name=name, file=f"{name}.png", caption=caption, note=note, png=png, width=width, height=height
    )


def _heatmaps(run: Run, ranked: Sequence[Site], top: int) -> list[tuple[str, Figure, str, str]]:
    """Activations beside their gradients, and parameters beside theirs; a figure only where sites exist."""
    out = []
    for name, pairs in (
        ("exponents_activations", ((Kind.ACTIVATION, "activations"), (Kind.ACTIVATION_GRAD, "activation gradients"))),
        ("exponents_parameters", ((Kind.PARAM, "parameters"), (Kind.PARAM_GRAD, "parameter gradients"))),
    ):
        panels, notes, kinds = {}, [], []
        for kind, what in pairs:
            sites, note = chosen(run, ranked, top, kinds=(kind,))
            if sites:
                total = sum(1 for s in run.sites if s.kind == kind)
                panels[f"{what}: the {len(sites)} riskiest of {total}" if note else f"{what} ({total})"] = sites
                notes += [f"{what}: {note}"] if note else []
                kinds.append(what)
        if panels:
            caption = (
                f"Share of each site's non-zero values per power of two ({' and '.join(kinds)}), "
                "with each format's max (solid), min normal (dashed) and min subnormal (dotted)."
            )
            out.append((name, fig.exponent_heatmap(run, panels, run.formats), caption, "; ".join(notes)))
    return out


def _scaling_section(run: Run, analysis: Analysis, save: Callable[..., EmbeddedFigure]) -> dict[str, Any]:
    scaling = analysis.scaling
    if scaling is None:
        return {
            "reason": "No gradient was recorded (call backward() while diagnose() is attached), "
            "so there is no loss scaling to replay."
        }
    save(
        "loss_scale",
        fig.loss_scale_curves(scaling),
        f"Share of gradients that {scaling.advice.fmt.name} flushes to zero at each loss scale 2^k: all gradients "
        f"(black) and the {len(scaling.demanding)} sites that need the largest scale.",
    )
    save(
        "grad_scaler",
        fig.grad_scaler_trajectory(scaling.simulation, run.loss_scales, scaling.flushed),
        "The loss scale a dynamic GradScaler would use at each recorded step"
        + (" with the run's own GradScaler settings" if scaling.own_settings else " (torch's defaults)")
        + ", skipped steps marked, dots: the scale the run recorded; below: the share of gradients "
        "flushed to zero at the simulated scale.",
    )
    # Every note is an approximation of the replay (a run that did not record every step): shown beneath it.
    text = str(scaling.simulation) + "".join(f"\nNB: {note}" for note in analysis.notes)
    return {"reason": None, "advice": scaling.advice_text, "simulation": text}


def _optimizer_section(
    run: Run, analysis: Analysis, top: int, save: Callable[..., EmbeddedFigure]
) -> dict[str, Any] | None:
    """The optimizer's state against each format and its updates against each format's rounding; None
    when the run recorded neither (no ``optimizer=``)."""
    ranked = [r.site for r in analysis.riskiest[run.formats[0]]]
    state, note = chosen(run, ranked, top, kinds=(Kind.OPTIMIZER_STATE,))
    updates = analysis.updates
    if not state and updates is None:
        return None
    if state:
        save(
            "optimizer_state",
            fig.range_chart(run, state, run.formats, note),
            "The optimizer's state (for Adam: exp_avg and exp_avg_sq) from its smallest to its largest non-zero "
            "value, against each format: what storing it in that format would flush or overflow.",
            note,
        )
    if updates is None:
        return {"rows": [], "formats": []}
    shown = list(updates.ranked[:_UPDATED_SHOWN])
    save(
        "update_ratios",
        optimizer_figures.update_ratio_heatmap(updates, shown),
        "log2 of |update| / |weight| per power of two, over the changed elements with a non-zero weight (a "
        "parameter whose steps changed nothing has an empty column); each format's solid line: below it an "
        "update always rounds away with a weight stored in it (in its normal range); dotted: above it, never.",
    )
    save(
        "updates_over_time",
        optimizer_figures.lost_over_time(updates),
        "Per recorded step, over all parameters: the share of changes each format would round away with the "
        "weights stored in it"
        + (", the share of non-zero gradients the weights' own dtype lost" if updates.lost_per_step else "")
        + (", and where Adam's eps dominated the denominator." if updates.eps_per_step else "."),
    )
    return {
        "rows": updates.rows[:_UPDATED_SHOWN],
        "formats": list(updates.stalled),
        "eps": updates.eps is not None,
        "total": len(updates.ranked),
        "lines": updates.always_lost_log2,
    }


def _sensitivity_section(sens: Sensitivity | None, save: Callable[..., EmbeddedFigure]) -> dict[str, Any] | None:
    """The precision-sensitivity section: the per-layer figure, the most fragile layers, the answers."""
    if sens is None:
        return None
    answers = list(sens.answers.values())
    kept = answers[-1].names or () if answers else ()
    save(
        "sensitivity",
        fig.sensitivity_chart(sens, kept),
        f"Signal to rounding-noise ratio of each leaf module's output in {sens.dtype}: local (the module alone "
        "on its fp32 inputs: how fragile it is itself) and propagated (the whole model under autocast: what "
        "it inherits as well). About 6 dB per mantissa bit; crosses: non-finite"
        + ("; shaded: kept in fp32 by the last answer." if kept else "."),
    )
    rows = [
        (e.label, e.describe(), sens.propagated[e.name].describe() if e.name in sens.propagated else "-")
        for e in sens.fragile(15)
    ]
    return {
        "summary": str(sens).splitlines()[0],
        "first_nonfinite": sens.first_nonfinite,
        "rows": rows,
        "answers": [{"text": str(a)} for a in answers],
    }


def _nonfinite_section(run: Run, origin: NonFiniteOrigin | None) -> dict[str, Any]:
    events = run.nonfinite_events()  # in order: the first of a phase is Run.first_nonfinite(phase=...)
    first = {phase: next((str(e) for e in events if e.phase == phase), None) for phase in ("forward", "backward")}
    return {
        "events": events[:_EVENTS_SHOWN],
        "total": len(events),
        "more": len(events) > _EVENTS_SHOWN,
        "first_forward": first["forward"],
        "first_backward": first["backward"],
        "anomalies": run.anomalies,
        "origin": str(origin) if origin is not None else None,
    }


def _table_context(run: Run, analysis: Analysis) -> dict[str, Any]:
    cols = columns(run.formats)
    groups: list[tuple[str, int]] = []
    for c in cols:
        if groups and groups[-1][0] == c.group:
            groups[-1] = (c.group, groups[-1][1] + 1)
        else:
            groups.append((c.group, 1))
    first_of_group = {i for i, c in enumerate(cols) if c.group and (i == 0 or cols[i - 1].group != c.group)}
    rows = [{"cells": cells, "risky": any(c.risk for c in cells)} for cells in site_rows(run, analysis)]
    return {
        "columns": cols,
        "groups": groups,
        "first_of_group": first_of_group,
        "rows": rows,
        "kinds": [k.value for k in Kind if any(s.kind == k for s in run.sites)],
    }
