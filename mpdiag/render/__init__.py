"""The stability report: one self-contained HTML file and its figures as PNG files beside it.

Rendering is the last stage: it formats a Run and its ``Analysis``, never a model or hooks, so a report
can be written during training, after it, or from a run file on another machine.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from mpdiag.analysis.overall import Analysis, analyse
from mpdiag.analysis.verdict import Verdict
from mpdiag.core import formats as _formats
from mpdiag.core.comparison import Comparison
from mpdiag.core.errors import MpdiagError
from mpdiag.core.events import NonFiniteOrigin
from mpdiag.core.run import Run
from mpdiag.core.sensitivity import Sensitivity

__all__ = ["report", "Report"]


@dataclass(frozen=True)
class Report:
    """What ``report`` wrote.

    Attributes:
        html: the report page (self-contained: figures are embedded).
        figures: figure name -> PNG file beside the page.
        verdicts: the verdict per format the page leads with (a comparison's page: none of its own).
        seconds: how long rendering took.
        parts: a comparison's page: precision -> that precision's own report, in a folder beside it.
    """

    html: Path
    figures: dict[str, Path] = field(default_factory=dict)
    verdicts: tuple[Verdict, ...] = ()
    seconds: float = 0.0
    parts: dict[str, Report] = field(default_factory=dict, repr=False)


def report(
    run: Run | Comparison,
    out_dir: str | os.PathLike[str],
    *,
    top: int = 40,
    scale_format: str | None = None,
    origin: NonFiniteOrigin | None = None,
    title: str | None = None,
    analysis: Analysis | None = None,
    sensitivity: Sensitivity | None = None,
) -> Report:
    """Write ``report.html`` and one PNG per figure into ``out_dir`` (created if missing).

    Args:
        run: a recorded run (``diag.run`` or ``mpdiag.load(path)``), or a ``mpdiag.compare`` result: its
            page has the summary, the loss curves against fp32's noise band, step time and peak memory
            per precision and each precision's verdicts, and each recorded precision's own report is
            written into a folder of that name beside it (``top`` and ``scale_format`` apply there).
        out_dir: the directory to write into; existing report files there are replaced.
        top: how many sites the figures show at most (the riskiest in the first tracked format; the
            table lists every site).
        scale_format: the format loss scaling is replayed for (default fp16 when tracked, else the first).
        origin: a ``mpdiag.trace_nonfinite`` result to show in the NaN/inf section.
        title: the page title (default "mpdiag stability report").
        analysis: ``mpdiag.analyse(run, scale_format=...)`` where already computed (the CLI's demo prints
            the terminal summary of the same one); analysed here when None.
        sensitivity: a ``mpdiag.sensitivity`` result: the page gains a section with each layer's local
            and propagated error and the ``keep_fp32`` answers found on it (call ``sens.keep_fp32()``
            first; rendering never runs the model).

    Examples:
        >>> import tempfile, torch, mpdiag
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> with mpdiag.diagnose(model) as diag:
        ...     model(torch.randn(4, 8)).sum().backward()
        >>> out = mpdiag.report(diag.run, tempfile.mkdtemp())
        >>> out.html.name, sorted(p.name for p in out.figures.values())[:2]
        ('report.html', ['exponents_activations.png', 'exponents_parameters.png'])
    """
    from mpdiag.render._build import build  # matplotlib is imported only when a report is written

    started = time.perf_counter()
    if isinstance(run, Comparison):
        if origin is not None or analysis is not None or sensitivity is not None:
            raise MpdiagError(
                "a comparison's report takes no origin=, analysis= or sensitivity=: those belong to one run "
                "(report a precision's run, comparison.results[precision].run, with them)"
            )
        return _comparison_report(run, Path(out_dir), top, scale_format, title, started)
    if not isinstance(run, Run):
        raise MpdiagError(
            "report() expects an mpdiag Run (diag.run or mpdiag.load(path)) or a Comparison (mpdiag.compare), "
            f"got {type(run).__name__}"
        )
    if not run.steps:
        raise MpdiagError("the run has no recorded steps; train at least one step with diagnose() attached")
    if top < 1:
        raise MpdiagError(f"top must be a positive number of sites, got {top}")
    if sensitivity is not None and not isinstance(sensitivity, Sensitivity):
        raise MpdiagError(f"sensitivity= expects a mpdiag.sensitivity() result, got {type(sensitivity).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    analysis = _analysed(run, scale_format, analysis)
    page, figures = build(
        run, analysis, out, top=top, origin=origin, title=title or "mpdiag stability report", sensitivity=sensitivity
    )
    html = out / "report.html"
    html.write_text(page, encoding="utf-8")
    return Report(html=html, figures=figures, verdicts=analysis.verdicts, seconds=time.perf_counter() - started)


def _comparison_report(
    cmp: Comparison, out: Path, top: int, scale_format: str | None, title: str | None, started: float
) -> Report:
    from mpdiag.render._comparison import Part, build_comparison

    out.mkdir(parents=True, exist_ok=True)
    parts: dict[str, Report] = {}
    for precision, result in cmp.results.items():
        if result.run is not None and result.run.steps:
            parts[precision] = report(result.run, out / precision, top=top, scale_format=scale_format,
                                      title=f"mpdiag report: {precision} in the comparison")  # fmt: skip
    linked = [
        Part(p, parts[p].verdicts if p in parts else (), f"{p}/report.html" if p in parts else None)
        for p in cmp.results
    ]
    page, figures = build_comparison(cmp, out, title=title or "mpdiag comparison of precisions", parts=linked)
    html = out / "report.html"
    html.write_text(page, encoding="utf-8")
    return Report(html=html, figures=figures, seconds=time.perf_counter() - started, parts=parts)


def _analysed(run: Run, scale_format: str | None, given: Analysis | None) -> Analysis:
    if given is None:
        return analyse(run, scale_format=scale_format)
    if scale_format is not None and _formats.get(scale_format).name != given.scale_format:
        raise MpdiagError(
            f"scale_format {scale_format!r} differs from the given analysis's "
            f"{given.scale_format!r}; pass scale_format to analyse() instead"
        )
    return given
