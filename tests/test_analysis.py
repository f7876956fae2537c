"""analyse(): one Analysis that holds what each analysis says, and that the report and the summary format."""

from __future__ import annotations

import ast
import sys
import warnings
from pathlib import Path

import pytest
import torch
from markupsafe import escape
from torch import nn

import mpdiag
from mpdiag.analysis.grad_scaler import APPROXIMATE
from mpdiag.analysis.gradients import scaler_overflows, underflow_per_step
from mpdiag.analysis.riskiest import riskiest
from mpdiag.analysis.verdict import Level, nonfinite_verdict, skips_verdict, verdicts
from mpdiag.core.errors import MpdiagError, MpdiagWarning
from mpdiag.render.terminal import summary

RENDER = Path(mpdiag.__file__).parent / "render"


def record_scaler_skip(every: int = 1) -> mpdiag.Run:
    """Four steps under a real GradScaler whose first scale, 2^100, overflows fp32's scaled gradients: it skips
    step 0 and backs off to 2^70, where the rest pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100, backoff_factor=2.0**-30)
    with mpdiag.diagnose(model, optimizer=opt, scaler=scaler, every=every) as diag:
        for _ in range(4):
            opt.zero_grad()
            scaler.scale(model(torch.randn(2, 4) * 1e12).sum()).backward()
            scaler.step(opt)
            scaler.update()
    return diag.run


def one_line(text: str) -> str:
    """Text as words separated by single spaces: the summary wraps sentences at 80 columns."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def skipped() -> tuple[mpdiag.Run, mpdiag.Analysis]:
    run = record_scaler_skip()
    return run, mpdiag.analyse(run)


def test_the_analysis_holds_what_each_analysis_says(skipped) -> None:
    run, analysis = skipped
    assert analysis.scaler_skips == scaler_overflows(run) and list(analysis.scaler_skips) == [0]
    assert analysis.verdicts == tuple(verdicts(run))
    assert all(isinstance(v.level, Level) for v in analysis.verdicts)
    assert analysis.nonfinite == nonfinite_verdict(run) and analysis.nonfinite is None  # the skip is the scaler's
    assert analysis.skips == skips_verdict(run) and "skipped 1 of 4" in analysis.skips
    for fmt in run.formats:
        assert str(analysis.advice[fmt]) == str(mpdiag.advise(run, fmt))
        assert analysis.riskiest[fmt][:3] == tuple(riskiest(run, fmt, n=3))
    scaling = analysis.scaling
    assert analysis.scale_format == "fp16" and scaling.advice is analysis.advice["fp16"]
    assert scaling.simulation == mpdiag.simulate_grad_scaler(run, "fp16") and scaling.own_settings
    assert scaling.flushed == underflow_per_step(
        run, "fp16", dict(zip(scaling.simulation.steps, scaling.simulation.scales))
    )
    assert scaling.curve == tuple(scaling.advice.curve())
    assert list(scaling.demanding) == scaling.advice.most_demanding(len(scaling.demanding))
    first = run.formats[0]
    assert analysis.closest_to_max[0] == min(analysis.riskiest[first], key=lambda r: r.headroom_bits).site
    assert analysis.nonfinite_per_step == {s: sum(v.nonfinite for v in run.records[s].values()) for s in run.steps}
    assert analysis.nonfinite_per_step[0] > 0 and analysis.notes == ()


def test_the_report_and_the_summary_show_the_facts_of_the_analysis(skipped, tmp_path: Path) -> None:
    run, analysis = skipped
    written = mpdiag.report(run, tmp_path, analysis=analysis)
    html = written.html.read_text(encoding="utf-8")
    text = summary(run, analysis=analysis)
    assert written.verdicts == analysis.verdicts
    for v in analysis.verdicts:
        assert str(escape(v.sentence)) in html and one_line(f"{v.level.upper()} {v.sentence}") in one_line(text)
    assert str(escape(analysis.skips)) in html and one_line(analysis.skips) in one_line(text)
    assert str(escape(str(analysis.scaling.advice))) in html
    assert str(escape(str(analysis.scaling.simulation))) in html
    for fmt in run.formats:  # the summary's rows are the analysis's 6 riskiest sites, in its order
        rows = text.split(f"\n{fmt}\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
        assert [row.split()[0] for row in rows] == [r.site.label.split()[0] for r in analysis.riskiest[fmt][:6]]


def test_given_an_analysis_neither_renderer_analyses_again(
    skipped, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, analysis = skipped

    def refuse(*args, **kwargs):
        raise AssertionError("analysed again")

    monkeypatch.setattr(sys.modules["mpdiag.render"], "analyse", refuse)
    monkeypatch.setattr(sys.modules["mpdiag.render.terminal"], "analyse", refuse)
    assert mpdiag.report(run, tmp_path, analysis=analysis, scale_format="fp16").verdicts == analysis.verdicts
    assert summary(run, analysis=analysis).startswith(f"{len(run.steps)} recorded step(s)")
    with pytest.raises(MpdiagError, match="scale_format 'bf16' differs from the given analysis's 'fp16'"):
        mpdiag.report(run, tmp_path, analysis=analysis, scale_format="bf16")


def test_the_demo_analyses_once_for_the_summary_and_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mpdiag.cli import main

    calls = []

    def counted(run: mpdiag.Run, **options) -> mpdiag.Analysis:
        calls.append(run)
        return mpdiag.analyse(run, **options)

    for module in ("mpdiag.analysis", "mpdiag.render", "mpdiag.render.terminal"):
        monkeypatch.setattr(sys.modules[module], "analyse", counted)
    assert main(["demo", "--steps", "2", "--out", str(tmp_path)]) == 0
    assert len(calls) == 1 and "2 recorded step(s)" in capsys.readouterr().out


def test_a_run_recorded_every_other_step_says_so_on_the_page_and_in_the_summary(tmp_path: Path) -> None:
    run = record_scaler_skip(every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MpdiagWarning)  # a note of the analysis, not a warning to catch
        analysis = mpdiag.analyse(run)
        html = mpdiag.report(run, tmp_path, analysis=analysis).html.read_text(encoding="utf-8")
        text = summary(run, analysis=analysis)
    assert analysis.notes == (APPROXIMATE,) and analysis.scaling.simulation.approximate
    assert str(escape(f"NB: {APPROXIMATE}")) in html
    note = text[text.index("NB: ") :]
    assert one_line(note) == f"NB: {APPROXIMATE}" and max(len(line) for line in note.splitlines()) <= 80
    with pytest.warns(MpdiagWarning, match="approximate: record with every=1"):  # the function still warns
        mpdiag.simulate_grad_scaler(run)


def test_bad_runs_get_clear_errors() -> None:
    with pytest.raises(MpdiagError, match=r"analyse\(\) expects an mpdiag Run"):
        mpdiag.analyse({"not": "a run"})  # type: ignore[arg-type]
    with pytest.raises(MpdiagError, match="no recorded steps"):
        mpdiag.analyse(mpdiag.Run(formats=("fp16",)))
    with pytest.raises(MpdiagError, match="scale_format 'tf32' was not tracked"):
        mpdiag.analyse(record_scaler_skip(), scale_format="tf32")


def imported_from_analysis(source: str) -> set[str]:
    """The names a module imports from mpdiag.analysis and its modules."""
    return {
        a.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mpdiag.analysis")
        for a in node.names
    }


@pytest.mark.parametrize("path", sorted(RENDER.glob("*.py")), ids=lambda p: p.name)
def test_render_imports_result_types_from_analysis_and_no_analysis(path: Path) -> None:
    names = imported_from_analysis(path.read_text(encoding="utf-8"))
    functions = {name for name in names if not name[0].isupper()}
    # report() and summary() analyse at the API edge; every other name is the type of a result.
    assert functions <= ({"analyse"} if path.name in ("__init__.py", "terminal.py") else set()), functions


def test_the_import_check_catches_an_analysis_function() -> None:
    source = "from mpdiag.analysis.scaling import LossScaleAdvice, advise\nfrom mpdiag.core.run import Run\n"
    assert imported_from_analysis(source) == {"LossScaleAdvice", "advise"}
