"""The HTML report: every section, figures that decode and show what they claim, numbers that match the
Run, user data kept as text, and a real headless Chromium that loads the page and sorts its table."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import chromium
from markupsafe import escape
from matplotlib.image import imread
from nonfinite_models import sqrt_model
from torch import nn

import mpdiag
from mpdiag.analysis.scaling import advise
from mpdiag.core.errors import MpdiagError, UnknownFormatError
from mpdiag.core.stats import HIST_EXPONENTS
from mpdiag.core.text import percent
from mpdiag.render import figures

XSS = "<script>alert(1)</script>"
SECTIONS = ("verdict", "environment", "ranges", "heatmap", "time", "scaling", "nonfinite", "sites")
FIGURES = ("ranges", "exponents_activations", "exponents_parameters", "over_time", "loss_scale", "grad_scaler")


def trouble_model() -> nn.Module:
    """Activations past fp16's max in 'embed', a module whose name is markup, tiny gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("embed", nn.Linear(4, 8)), (XSS, nn.ReLU()), ("out", nn.Linear(8, 2))]))
    with torch.no_grad():
        model.embed.weight.mul_(1e5)
    return model


def record_trouble() -> mpdiag.Run:
    model = trouble_model()
    with mpdiag.diagnose(model) as diag:
        for step in range(3):
            x = torch.randn(16, 4)
            if step == 2:
                x[0, 0] = float("nan")  # NaN enters at step 2, in forward
            model.zero_grad()
            (model(x).sum() * 1e-9).backward()
            diag.step()
    return diag.run


@pytest.fixture(scope="module")
def trouble(tmp_path_factory: pytest.TempPathFactory) -> tuple[mpdiag.Run, mpdiag.Report, str]:
    run = record_trouble()
    written = mpdiag.report(run, tmp_path_factory.mktemp("report"))
    return run, written, written.html.read_text(encoding="utf-8")


class SiteTable(HTMLParser):
    """Rows of the site table as {column title: (text, data-v)} (the stdlib parser: a real HTML parser)."""

    def __init__(self) -> None:
        super().__init__()
        self.titles: list[str] = []
        self.rows: list[list[tuple[str, str]]] = []
        self._in_table = self._in_head_title = False
        self._cell: list | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("id") == "site-table":
            self._in_table = True
        elif self._in_table and tag == "th" and "data-col" in a:
            self._in_head_title = True
            self.titles.append("")
        elif self._in_table and tag == "tr" and self.titles:
            self.rows.append([])
        elif self._in_table and tag == "td":
            self._cell = ["", a.get("data-v") or ""]

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_table = False
        elif tag == "th":
            self._in_head_title = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1].append((self._cell[0], self._cell[1]))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._in_head_title:
            self.titles[-1] += data
        elif self._cell is not None:
            self._cell[0] += data

    def row(self, name: str, kind: str, fmt_offset: int = 0) -> list[tuple[str, str]]:
        return next(r for r in self.rows if r[0][0] == name and r[1][0] == kind)


def parse_table(html: str) -> SiteTable:
    parser = SiteTable()
    parser.feed(html)
    return parser


def test_report_has_every_section_and_every_figure_decodes(trouble) -> None:
    run, written, html = trouble
    for section in SECTIONS:
        assert f'id="{section}"' in html
    assert set(written.figures) == set(FIGURES)
    for name, path in written.figures.items():
        assert path == written.html.parent / f"{name}.png" and path.exists()
        image = imread(path)  # a real PNG decoder
        height, width = image.shape[:2]
        assert 600 <= width <= 4000 and 300 <= height <= 6000, (name, width, height)
        assert image[..., :3].std() > 0.05  # not a blank canvas
        assert f'width="{width}" height="{height}"' in html
    assert html.count('src="data:image/png;base64,') == len(FIGURES)  # embedded: no file needed to view
    assert "http://" not in html and "https://" not in html  # nothing to fetch from a network


def test_verdicts_say_what_the_run_shows(trouble) -> None:
    run, written, html = trouble
    by_format = {v.fmt: v for v in written.verdicts}
    fp16, bf16 = by_format["fp16"], by_format["bf16"]
    assert fp16.level == "fail" and fp16.first_overflow_step == 0 and "embed (activation)" in fp16.overflow_sites
    assert bf16.level != "fail" and not bf16.overflow_sites
    assert fp16.gradient_underflow == pytest.approx(advise(run, "fp16").at(1.0).underflow)
    for v in written.verdicts:
        assert f'<div class="verdict {v.level}" data-format="{v.fmt}">' in html
        assert str(escape(v.sentence)) in html
    assert "NaN/inf first appeared at step 2 in the forward pass" in html


def test_table_numbers_match_the_run(trouble) -> None:
    run, _, html = trouble
    table = parse_table(html)
    assert len(table.rows) == len(run.sites)  # every site, whatever the figures show
    titles = table.titles
    assert titles[:6] == ["site", "kind", "dtype", "amax", "amin≠0", "NaN/inf"]
    row = table.row("embed", "activation")
    stats = run.stats("embed", "activation")
    assert float(row[titles.index("amax")][1]) == stats.amax
    assert float(row[titles.index("amin≠0")][1]) == stats.amin_nonzero
    assert int(row[titles.index("NaN/inf")][0]) == stats.nonfinite > 0
    fp16 = titles.index("head")  # the first format's columns come first: fp16
    head, foot, under, subn, over = row[fp16 : fp16 + 5]
    assert float(head[1]) == pytest.approx(math.log2(65504 / stats.amax))
    assert over[0] == percent(stats.overflow("fp16") / stats.finite)
    assert float(over[1]) > 0
    grad = table.row("out.weight", "param_grad")
    assert grad[fp16 + 2][0] == percent(
        run.stats("out.weight", "param_grad").underflow("fp16") / run.stats("out.weight", "param_grad").finite_nonzero
    )


def test_sections_show_the_analysis_of_the_run(trouble) -> None:
    run, _, html = trouble
    assert str(escape(str(advise(run, "fp16")))) in html
    assert str(escape(str(run.first_nonfinite(phase="forward")))) in html
    # the environment section's table holds the torch version the run was recorded with, as its own row
    assert f"<tr><td>torch</td><td>{escape(run.meta['environment']['torch'])}</td></tr>" in html
    assert run.meta["environment"]["torch"] == torch.__version__


def test_module_names_are_text_never_markup(trouble) -> None:
    _, _, html = trouble
    assert XSS not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script>") == 1  # the page's own sorting script, nothing else


def test_figures_show_the_values_they_claim(trouble) -> None:
    run, _, _ = trouble
    site = mpdiag.Site("embed", mpdiag.Kind.ACTIVATION)
    stats = run.stats(*site)
    chart = figures.range_chart(run, [site], ["fp16", "bf16"])
    for ax in chart.axes[:2]:
        xs = np.concatenate([np.asarray(seg)[:, 0] for c in ax.collections for seg in c.get_segments()])
        assert xs.min() == pytest.approx(math.log2(stats.amin_nonzero))
        assert xs.max() == pytest.approx(math.log2(stats.amax))
    fp16_colours = {tuple(c) for c in chart.axes[0].collections[0].get_colors()}
    assert any(c[0] > 0.8 and c[1] < 0.3 for c in fp16_colours)  # red: the part past fp16's max
    bf16_colours = {tuple(c) for c in chart.axes[1].collections[0].get_colors()}
    assert not any(c[0] > 0.8 and c[1] < 0.3 for c in bf16_colours)

    heat = figures.exponent_heatmap(run, {"activations": [site]}, ["fp16"])
    image = heat.axes[0].images[0]
    left = image.get_extent()[0]
    shares = np.ma.filled(image.get_array(), 0.0)[0]
    expected = stats.hist / stats.hist.sum()
    start = int(left - HIST_EXPONENTS[0])
    assert np.allclose(
        np.where(shares > 1e-6, shares, 0),
        np.where(expected[start : start + len(shares)] > 1e-6, expected[start : start + len(shares)], 0),
    )

    over = figures.over_time(run, [site], ["fp16"], mpdiag.analyse(run))
    line = over.axes[0].lines[0]
    assert list(line.get_ydata()) == [math.log2(run.stats("embed", "activation", s).amax) for s in run.steps]
    bars = [p.get_height() for p in over.axes[1].patches]
    assert bars[:3] == [sum(v.nonfinite for v in run.records[s].values()) for s in run.steps]

    curves = figures.loss_scale_curves(mpdiag.analyse(run).scaling)
    everything = next(line for line in curves.axes[0].lines if line.get_label() == "all gradients")
    assert list(everything.get_ydata()) == [100 * o.underflow for o in advise(run, "fp16").curve()]


def test_grad_scaler_figure_shows_the_simulation(trouble) -> None:
    run, _, _ = trouble
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = mpdiag.simulate_grad_scaler(run, init_scale=2.0**60)  # overflows: backs off step by step
    figure = figures.grad_scaler_trajectory(sim, {}, dict.fromkeys(sim.steps, 0.5))
    scale_line, skipped = figure.axes[0].lines[:2]
    assert list(scale_line.get_ydata()) == [math.log2(s) for s in sim.scales]
    assert list(skipped.get_xdata()) == sim.skipped_steps and sim.skipped_steps


def test_report_of_a_forward_only_run_explains_the_missing_scaling(tmp_path: Path) -> None:
    (tmp_path / "loss_scale.png").write_bytes(b"from an earlier report")  # must not be left as if it were this run's
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    with mpdiag.diagnose(model) as diag, torch.no_grad():
        model(torch.randn(2, 4))
    written = diag.report(tmp_path)
    html = written.html.read_text(encoding="utf-8")
    assert "No gradient was recorded" in html and "loss_scale" not in written.figures
    assert not (tmp_path / "loss_scale.png").exists()
    assert "No NaN or inf was recorded" in html
    assert {v.level for v in written.verdicts} == {"ok"}


def test_many_sites_figures_show_the_riskiest_and_the_table_all(tmp_path: Path) -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    with mpdiag.diagnose(model) as diag:
        model(torch.randn(2, 4)).sum().backward()
    written = mpdiag.report(diag.run, tmp_path, top=5)
    html = written.html.read_text(encoding="utf-8")
    assert f"the 5 riskiest of {len(diag.run.sites)} sites; the table lists all" in html
    assert len(parse_table(html).rows) == len(diag.run.sites)


def test_anomaly_mode_records_appear_with_their_traceback(tmp_path: Path) -> None:
    model = sqrt_model()  # sqrt of negative values: NaN in forward, caught by anomaly mode in backward
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with (
            pytest.raises(RuntimeError, match="returned nan values"),
            mpdiag.diagnose(model) as diag,
            torch.autograd.detect_anomaly(),
        ):
            model(torch.randn(8, 4)).sum().backward()
    run = diag.run
    assert run.anomalies
    html = mpdiag.report(run, tmp_path).html.read_text(encoding="utf-8")
    record = run.anomalies[0]
    assert f"Anomaly mode, step {record.step}: {record.node}" in html
    assert str(escape(record.traceback[-1].strip())) in html


def test_bad_arguments_get_clear_errors(tmp_path: Path, trouble) -> None:
    run, _, _ = trouble
    with pytest.raises(MpdiagError, match="expects an mpdiag Run"):
        mpdiag.report({"not": "a run"}, tmp_path)  # type: ignore[arg-type]
    with pytest.raises(MpdiagError, match=r"no recorded steps; train at least one step with diagnose\(\) attached"):
        mpdiag.report(mpdiag.Run(formats=("fp16",)), tmp_path)
    with pytest.raises(MpdiagError, match="top must be a positive number of sites, got 0"):
        mpdiag.report(run, tmp_path, top=0)
    with pytest.raises(MpdiagError, match="scale_format 'tf32' was not tracked in this run; tracked formats are fp16"):
        mpdiag.report(run, tmp_path, scale_format="tf32")
    with pytest.raises(UnknownFormatError, match="unknown numeric format 'fp17'; expected one of"):
        mpdiag.report(run, tmp_path, scale_format="fp17")


def test_chromium_opens_the_report_sorts_and_filters_the_table(trouble) -> None:
    run, written, _ = trouble
    from selenium.webdriver.common.by import By

    with chromium() as browser:
        browser.get(written.html.as_uri())
        assert browser.title == "mpdiag stability report"
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);"
        )
        assert len(images) == len(FIGURES) and all(ok and w > 0 and h > 0 for ok, w, h in images)
        assert browser.find_element(By.ID, "verdict").is_displayed()

        def column(title: str) -> list[float]:
            index = [
                th.text.strip(" ▲▼")
                for th in browser.find_elements(By.CSS_SELECTOR, "#site-table thead tr:nth-child(2) th")
            ].index(title)
            return [
                float(td.get_attribute("data-v"))
                for td in browser.find_elements(
                    By.CSS_SELECTOR, f"#site-table tbody tr:not([hidden]) td:nth-child({index + 1})"
                )
            ]

        header = next(
            th
            for th in browser.find_elements(By.CSS_SELECTOR, "#site-table thead tr:nth-child(2) th")
            if th.text.strip() == "amax"
        )
        before = column("amax")
        header.click()
        assert header.get_attribute("aria-sort") == "descending"
        assert column("amax") == sorted(before, reverse=True) and column("amax") != before
        header.click()
        assert header.get_attribute("aria-sort") == "ascending" and column("amax") == sorted(before)

        box = browser.find_element(By.ID, "site-filter")
        box.send_keys("embed")
        visible = browser.find_elements(By.CSS_SELECTOR, "#site-table tbody tr:not([hidden])")
        assert visible and all("embed" in r.find_element(By.TAG_NAME, "td").text for r in visible)
        assert browser.find_element(By.ID, "shown-count").text == str(len(visible))
        # The markup-named module shows as text in the table and ran no script.
        assert browser.execute_script("return document.querySelectorAll('script').length;") == 1
        box.clear()
        box.send_keys("script")
        rows = browser.find_elements(By.CSS_SELECTOR, "#site-table tbody tr:not([hidden]) td:first-child")
        assert [r.text for r in rows] and all(r.text == XSS for r in rows)
