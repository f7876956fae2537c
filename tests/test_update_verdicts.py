"""The optimizer's updates where users read them: the always-lost line each format's verdict quotes
(property-tested against torch's real casts), the verdict clauses against counts taken by hand, the
terminal summary, the report's optimizer section in a real browser."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from browser import chromium
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mpdiag
from mpdiag.analysis.updates import TOLERATED_STALL, always_lost_log2, analyse_updates, never_lost_log2
from mpdiag.core import formats
from mpdiag.core.text import percent
from mpdiag.core.updates import RATIO_BINS, UpdateStats

NARROW = ("fp16", "bf16")  # the formats a weight is stored in
STEPS = 4


def _normal_range_weight(fmt: formats.Format, weight: float) -> float | None:
    """``weight`` as an fp32 value, when it lies in ``fmt``'s normal range below its max (else None)."""
    w = float(torch.tensor(weight, dtype=torch.float32))
    return w if fmt.min_normal <= abs(w) <= fmt.max else None


WEIGHTS = st.floats(allow_nan=False, allow_infinity=False, min_value=-7e4, max_value=7e4, width=32)


@settings(max_examples=400, deadline=None)
@given(
    name=st.sampled_from(NARROW),
    weight=WEIGHTS,
    ratio=st.floats(min_value=-1.0, max_value=1.0, exclude_min=True, exclude_max=True),
)
def test_below_the_line_any_weight_stored_in_the_format_loses_the_update(
    name: str, weight: float, ratio: float
) -> None:
    """The fp32 weight is anything in the format's normal range, not only a value of the format: its
    stored value may lie up to a half-spacing away, across a power of two."""
    fmt = formats.get(name)
    w = _normal_range_weight(fmt, weight)
    if w is None:
        return
    stored = torch.tensor(w).to(fmt.dtype)
    update = torch.tensor(w * ratio * 2.0 ** always_lost_log2(fmt), dtype=torch.float32)  # < 2^line * |w|
    assert (stored.float() + update).to(fmt.dtype) == stored


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(NARROW), weight=WEIGHTS, ratio=st.floats(min_value=1.0, max_value=2.0**6))
def test_from_the_upper_line_any_weight_stored_in_the_format_keeps_the_update(
    name: str, weight: float, ratio: float
) -> None:
    fmt = formats.get(name)
    w = _normal_range_weight(fmt, weight)
    if w is None or abs(w) * 2**7 > fmt.max:  # the moved weight stays finite
        return
    stored = torch.tensor(w).to(fmt.dtype)
    for sign in (1.0, -1.0):
        update = torch.tensor(sign * abs(w) * ratio * 2.0 ** never_lost_log2(fmt), dtype=torch.float32)
        assert (stored.float() + update).to(fmt.dtype) != stored


@pytest.mark.parametrize("name", NARROW)
def test_both_lines_are_tight_within_a_bit(name: str) -> None:
    """Just above the lower line some update is kept; just below the upper one some update is lost."""
    fmt = formats.get(name)
    largest_in_binade = torch.tensor(2.0 - fmt.eps)  # the half-spacing is smallest relative to it
    stored = largest_in_binade.to(fmt.dtype).float()
    assert (stored + stored * 2.0 ** (always_lost_log2(fmt) + 1) * 1.01).to(fmt.dtype).float() != stored
    power_of_two = torch.tensor(1.0).to(fmt.dtype).float()  # the half-spacing is largest relative to it
    assert (power_of_two + 2.0 ** (never_lost_log2(fmt) - 1)).to(fmt.dtype).float() == power_of_two  # a tie: even


def _train(dtype: torch.dtype = torch.float32, lr: float = 1e-4, eps: float = 1e-8, **options):  # noqa: ANN003, ANN202
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4)).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=eps)
    g = torch.Generator().manual_seed(1)
    grads_and_changes = []
    with mpdiag.diagnose(model, optimizer=opt, **options) as diag:
        for _ in range(STEPS):
            opt.zero_grad()
            model(torch.randn(16, 8, generator=g).to(dtype)).float().pow(2).mean().backward()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            grads_and_changes += [(p.grad != 0, p.detach() != b) for p, b in zip(model.parameters(), before)]
    return diag.run, grads_and_changes


def test_pure_bf16_weights_warn_with_the_share_they_really_lost() -> None:
    run, by_hand = _train(torch.bfloat16)
    bf16 = next(v for v in mpdiag.verdicts(run) if v.fmt == "bf16")
    lost = sum(int((g & ~c).sum()) for g, c in by_hand)
    assert bf16.lost_updates.overall == pytest.approx(lost / sum(int(g.sum()) for g, _ in by_hand))
    assert bf16.level == "warn" and "its weights stored in bf16 lost" in bf16.sentence
    assert f"lost {percent(bf16.lost_updates.overall)} of their updates" in bf16.sentence
    assert bf16.stalled_updates is None  # nothing narrower-than-itself to predict for bf16 weights


def test_fp32_weights_get_the_stalled_clause_and_the_level_is_left_alone() -> None:
    run, _ = _train()
    without, _ = _train(updates=False)
    with_updates = {v.fmt: v for v in mpdiag.verdicts(run)}
    plain = {v.fmt: v for v in mpdiag.verdicts(without)}
    bf16 = with_updates["bf16"]
    worst, share = bf16.stalled_updates.worst
    assert share == run.update_stats(worst).stalled_share("bf16") > TOLERATED_STALL
    assert f"would lose {percent(share)} of the updates of {worst}" in bf16.sentence
    assert "2^-10 of a weight in its normal range" in bf16.sentence and bf16.lost_updates is None
    assert {f: v.level for f, v in with_updates.items()} == {f: v.level for f, v in plain.items()}
    assert all(v.stalled_updates is None and "updates" not in v.sentence for v in plain.values())


def test_the_summary_and_the_report_show_the_updates_and_eps(tmp_path: Path) -> None:
    run, _ = _train(lr=1e-3, eps=1e-2)  # an eps far above these gradients' roots: it dominates
    analysis = mpdiag.analyse(run)
    eps = analysis.updates.eps
    assert eps.called_out and analysis.updates.sentence.startswith("Adam's eps dominates the denominator")
    text = mpdiag.summary(run)
    assert "Updates, the 4 most affected of 4 parameters" in text and analysis.updates.sentence[:40] in text
    assert all(len(line) <= 80 for line in text.splitlines())
    written = mpdiag.report(run, tmp_path / "report")
    assert {"optimizer_state", "update_ratios", "updates_over_time"} <= set(written.figures)
    html = written.html.read_text()
    assert 'id="optimizer"' in html and 'id="eps"' in html
    first = analysis.updates.ranked[0]
    with chromium() as browser:
        browser.get(written.html.as_uri())
        images = browser.execute_script(
            "return [...document.querySelectorAll('#optimizer img')].map(i => [i.complete, i.naturalWidth])"
        )
        assert len(images) == 3 and all(ok and width > 0 for ok, width in images)
        cells = browser.execute_script(
            "return [...document.querySelectorAll('#updates tr:nth-child(2) td')].map(td => td.textContent)"
        )
    u = run.update_stats(first)
    assert cells[:3] == [first, "float32", f"{100 * u.nonzero / u.numel:.1f}%"]
    assert cells[-1] == f"{100 * u.eps_share:.1f}%"


def test_a_report_without_an_optimizer_has_no_optimizer_section(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    with mpdiag.diagnose(model) as diag:
        model(torch.randn(3, 4)).sum().backward()
    written = mpdiag.report(diag.run, tmp_path)
    assert 'id="optimizer"' not in written.html.read_text()
    assert not {"optimizer_state", "update_ratios", "updates_over_time"} & set(written.figures)
    assert mpdiag.analyse(diag.run).updates is None and "Updates," not in mpdiag.summary(diag.run)


def test_the_most_affected_rank_first_by_a_16_bit_weights_loss_then_by_the_first_formats() -> None:
    def stats(name: str, dtype: str, stalled: dict[str, int], lost: int) -> UpdateStats:
        return UpdateStats(name, dtype, 100, 100, stalled, lost, (0,) * RATIO_BINS, 0, grad_nonzero=100)

    updates = {
        "noisy": stats("noisy", "float32", {"fp16": 10, "bf16": 90}, lost=5),  # fp32's own rounding noise
        "stalls": stats("stalls", "float32", {"fp16": 60, "bf16": 99}, lost=0),
        "pure": stats("pure", "bfloat16", {}, lost=40),  # a bf16 weight's real loss comes first
    }
    run = mpdiag.Run(formats=("fp16", "bf16"), records={0: {}}, updates={0: updates})
    assert analyse_updates(run).ranked == ("pure", "stalls", "noisy")
