"""Every Python example in the documentation runs, page by page, in order, as a reader would run it."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_hooks" not in p.parts)


# What the pages' comments and prose claim about their examples' results, checked after they run.
CLAIMS = {
    "index.md": ["report.html.exists()", "len(report.verdicts) == 4", "stats.amax > 0"],
    "nan-loss.md": [
        "(first.step, first.phase, first.name, first.produced) == (3, 'forward', '0', True)",
        "(origin.op, origin.module, origin.phase) == ('aten.sqrt.default', '0', 'forward')",
        "(record.node, record.module) == ('AddmmBackward0', '2')",
        "diag.run.first_nonfinite().name == '0'",
    ],
    "loss-scale.md": [
        "advice.at(1.0).underflow > 0.5 and advice.recommended is not None",
        "result.at(advice.recommended).underflow < result.at(1.0).underflow",
    ],
    "keep-fp32.md": [
        "answer.names == ('1.wo',) and sens.first_nonfinite == '1.wo'",
        "sens.loss_low != sens.loss_low and sens.local['1.wo'].nonfinite",  # NaN
        "abs(float(loss) - sens.loss_fp32) / sens.loss_fp32 <= 1e-3",
    ],
    "compare-precisions.md": [
        "list(cmp.results) == ['fp32', 'bf16', 'fp16', 'bf16-pure']",
        "all(len(r.losses) == 20 for r in cmp.results.values())",
        "cmp.results['bf16'].convergence.within_noise and cmp.noise.band[0] == 0",
        "cmp.results['bf16'].peak_memory < cmp.results['fp32'].peak_memory",
        "report.parts['bf16'].html.exists() and (report.html.parent / 'loss_curves.png').exists()",
    ],
    "cheaper-formats.md": ["{v.fmt: v.level for v in verdicts(diag.run)}['bf16'] == 'ok'"],
    "long-runs.md": ["live.steps == [0, 10, 20, 30, 40, 50]", "run.steps[-1] == 90"],
    "transformers-trainer.md": [
        "run.steps == [1, 2, 3]",
        "run.stats('transformer.h.0.mlp.c_fc', 'activation', step=1).calls == 2",
        "run.meta['environment']['autocast_dtype'] == 'bfloat16'",
        "callback.report.html.exists()",
        "advice.recommended is not None",
    ],
    "lightning.md": [
        "run.steps == [0, 1, 2]",
        "run.stats('net.0', 'activation', step=0).calls == 2",
        "run.meta['environment']['autocast_dtype'] == 'bfloat16'",
        "mpdiag.load('lightning.mpdiag').steps == [0, 1, 2]",
    ],
    "optimizer.md": [
        "u.stalled_share('bf16') > 0.8 and u.stalled_share('fp16') < u.stalled_share('bf16')",
        "abs(pure.update_stats('0.weight').lost_share - u.stalled_share('bf16')) < 0.05",  # predicted = lost
        "bf16.level == 'warn' and {v.fmt: v.level for v in mpdiag.verdicts(master)}['bf16'] == 'ok'",
        "state.underflow('fp16') > 0 and mpdiag.analyse(loose).updates.sentence is not None",
    ],
    "tensorboard.md": ["len(amax) == 5", "diag.run.steps == [0, 1, 2, 3, 4]"],
    "stacks.md": [
        "all(advice.limiting_sites) and '' not in advice.limiting_sites",
        "diag.run.steps == [0, 1]",
        "diag.run.meta['environment']['autocast_dtype'] == 'bfloat16'",
    ],
}


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)\n```", page.read_text(encoding="utf-8"), flags=re.S)


def test_every_claim_is_about_a_page_whose_examples_run() -> None:
    # A claim keyed by a page that was renamed, or lost its examples, would silently never be checked.
    assert set(CLAIMS) <= {p.name for p in PAGES if python_blocks(p)}


def test_every_page_is_in_the_site_navigation() -> None:
    nav = (DOCS.parent / "mkdocs.yml").read_text(encoding="utf-8")
    for page in PAGES:
        assert str(page.relative_to(DOCS)) in nav, f"{page} is not in mkdocs.yml's nav"


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: str(p.relative_to(DOCS)))
def test_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if page.name == "loss-scale.md":
        from torch_support import cpu_fp16_autocast

        if not cpu_fp16_autocast():
            pytest.skip("the page replays fp16 autocast on the CPU, which needs torch >= 2.3")
    monkeypatch.chdir(tmp_path)  # examples write run files and reports into the working directory
    namespace: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, code in enumerate(python_blocks(page)):
            exec(compile(code, f"{page.name} block {i + 1}", "exec"), namespace)
    for claim in CLAIMS.get(page.name, []):
        assert eval(claim, namespace), claim
