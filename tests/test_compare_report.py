"""A comparison's report and the mpdiag compare command: the page shows what the Comparison holds, its
figures decode, each precision's own report is linked, and a real Chromium loads it all."""

from __future__ import annotations

import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from browser import chromium
from markupsafe import escape
from matplotlib.image import imread
from torch import nn

import mpdiag
from mpdiag.core.errors import MpdiagError


def _comparison() -> mpdiag.Comparison:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 2))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)) for _ in range(6)]
    return mpdiag.compare(
        model,
        lambda m, b: F.mse_loss(m(b[0]).float(), b[1]),
        batches,
        make_optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
        precisions=("bf16", "fp16"),
        grad_scaler={"init_scale": 2.0**30},
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[mpdiag.Comparison, mpdiag.Report, str]:
    cmp = _comparison()
    out = mpdiag.report(cmp, tmp_path_factory.mktemp("compare"), top=10)
    return cmp, out, out.html.read_text(encoding="utf-8")


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "a" and values.get("href"):
            self.hrefs.append(str(values["href"]))
        if values.get("id"):
            self.ids.append(str(values["id"]))


def test_the_page_has_every_section_the_summary_and_a_row_per_precision(written) -> None:  # noqa: ANN001
    cmp, out, page = written
    links = _Links()
    links.feed(page)
    for section in ("summary", "convergence", "cost", "table", "verdicts", "method"):
        assert section in links.ids
    for precision in cmp.results:
        text = cmp.line(precision).split(": ", 1)[1]
        assert f'data-precision="{precision}"' in page and str(escape(text)) in page
    assert page.count("<tr>") >= 1 + len(cmp.results)
    fp16 = cmp.results["fp16"]
    assert ", ".join(map(str, fp16.skipped_steps)) in page  # the table's skipped steps
    assert str(escape(cmp.memory)) in page and str(escape(cmp.noise.how)) in page


def test_figures_decode_and_each_recorded_precision_has_its_own_linked_report(written) -> None:  # noqa: ANN001
    cmp, out, page = written
    assert set(out.figures) == {"loss_curves", "cost"}
    for path in out.figures.values():
        height, width, _ = imread(path).shape
        assert width >= 600 and height >= 200
    assert set(out.parts) == set(cmp.results)
    links = _Links()
    links.feed(page)
    for precision, part in out.parts.items():
        assert part.html == out.html.parent / precision / "report.html" and part.html.exists()
        assert f"{precision}/report.html" in links.hrefs
        assert part.verdicts and all(str(escape(v.sentence)) in page for v in part.verdicts)


def test_a_comparison_without_runs_links_no_report(tmp_path: Path) -> None:
    cmp = _comparison()
    bare = mpdiag.Comparison(
        results={p: mpdiag.PrecisionResult(**{**r.__dict__, "run": None}) for p, r in cmp.results.items()},
        noise=cmp.noise, device=cmp.device, steps=cmp.steps, timing=cmp.timing, memory=cmp.memory,
    )  # fmt: skip
    out = mpdiag.report(bare, tmp_path)
    assert out.parts == {} and "Not recorded" in out.html.read_text(encoding="utf-8")
    with pytest.raises(MpdiagError, match="takes no origin=, analysis= or sensitivity="):
        mpdiag.report(cmp, tmp_path, analysis=mpdiag.analyse(cmp.reference.run))


def test_chromium_loads_the_page_its_figures_and_a_linked_report(written) -> None:  # noqa: ANN001
    cmp, out, _ = written
    from selenium.webdriver.common.by import By

    with chromium() as browser:
        browser.get(out.html.as_uri())
        assert browser.title == "mpdiag comparison of precisions"
        assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        images = browser.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);")
        assert len(images) == 2 and all(ok and w > 0 for ok, w in images)
        browser.find_element(By.CSS_SELECTOR, 'a[href="bf16/report.html"]').click()
        assert browser.title == "mpdiag report: bf16 in the comparison"
        assert browser.find_element(By.ID, "verdict").is_displayed()


def test_mpdiag_compare_trains_prints_a_line_per_precision_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = subprocess.run(
        [sys.executable, "-m", "mpdiag", "compare", "--steps", "4", "--precisions", "bf16", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith("fp32: the reference")
    assert result.stdout.splitlines()[2].startswith("bf16: ")
    assert f"report: {out / 'report.html'}" in result.stdout
    assert (out / "bf16" / "report.html").exists() and (out / "loss_curves.png").exists()
    for precision in ("fp32", "bf16", "fp32 (noise)"):  # a bar per training, written once off a terminal
        assert f"{precision} [########################] step 4/4" in result.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "mpdiag", "compare", "--precisions", "fp12"], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "precisions must be among" in bad.stderr
