"""advise(): the analytic loss-scale replay against real casts, and the advice users see."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gradient_runs import record_sites
from hypothesis import given
from hypothesis import strategies as st
from models import backward_and_step
from torch import nn
from torch_support import cpu_fp16_autocast

import mpdiag
from mpdiag.analysis.scaling import advise
from mpdiag.core.errors import MpdiagError


def record(grads: list[torch.Tensor], scaler_scale: float | None = None) -> mpdiag.Run:
    """A run whose only gradient site is a parameter with exactly these gradients, one per step."""
    param = nn.Parameter(torch.zeros_like(grads[0]))
    holder = nn.Module()
    holder.register_parameter("w", param)
    with mpdiag.diagnose(holder) as diag:
        for g in grads:
            param.grad = g.clone() if scaler_scale is None else g * scaler_scale
            diag.step()
    return diag.run


def real_outcome(grads: list[torch.Tensor], k: int) -> tuple[bool, int, int, int]:
    """(overflow, underflow, ties, non-zero) of x * 2^k cast to fp16, counted on the real cast."""
    overflow, under, ties, nonzero = False, 0, 0, 0
    for g in grads:
        cast = (g * 2.0**k).to(torch.float16)
        nz = (g != 0) & torch.isfinite(g)
        overflow |= bool((~torch.isfinite(cast) & nz).any())
        under += int(((cast == 0) & nz).sum())
        ties += int(((g * 2.0**k).abs() == 2.0**-25).sum())
        nonzero += int(nz.sum())
    return overflow, under, ties, nonzero


@given(st.lists(st.floats(-40, 10), min_size=1, max_size=64), st.integers(-20, 40), st.data())
def test_replay_agrees_with_casting_each_scale(log2_magnitudes: list[float], k: int, data: st.DataObject) -> None:
    grads = torch.tensor([2.0**e for e in log2_magnitudes], dtype=torch.float32)
    grads *= torch.tensor(data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=len(grads), max_size=len(grads))))
    adv = advise(record([grads]), "fp16", max_underflow=0.5)
    out = adv.at(2.0**k)
    overflow, under, ties, nonzero = real_outcome([grads], k)
    assert out.overflow == overflow  # exact
    assert round(out.underflow * nonzero) == under - ties  # exact but for values exactly on the tie


def test_ties_are_the_only_difference() -> None:
    grads = torch.tensor([2.0**-25, 2.0**-26, 2.0**-24, 1.0])
    out = advise(record([grads])).at(1.0)
    assert out.underflow == 1 / 4  # the tie 2^-25 rounds to zero too, but sits in a bin that mostly does not
    assert real_outcome([grads], 0)[1] == 2


def test_tiny_gradients_need_scaling_and_the_advice_works() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    with mpdiag.diagnose(model) as diag:
        for _ in range(4):
            model.zero_grad()
            (model(torch.randn(16, 32)).pow(2).mean() * 1e-6).backward()
            diag.step()
    adv = advise(diag.run, "fp16")
    without = adv.at(1.0)
    assert without.underflow > 0.2 and not without.overflow
    best = adv.at(adv.recommended)
    assert best.underflow < 1e-3 and not best.overflow
    low, high = adv.window
    assert low <= adv.recommended <= high
    assert adv.at(high * 2).overflow  # one step above the window, some step overflows
    assert adv.at(high * 2).overflow_sites[0] == adv.overflow_limiter
    text = str(adv)
    assert "recommended scale 2^" in text and "window 2^" in text and "underflow" in text


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler('cpu') needs torch >= 2.3")
def test_runs_recorded_under_a_grad_scaler_are_advised_on_true_gradients() -> None:
    def train(use_scaler: bool) -> mpdiag.Run:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1) if use_scaler else None
        with mpdiag.diagnose(model, optimizer=opt, scaler=scaler) as diag:
            for _ in range(3):
                opt.zero_grad()
                backward_and_step(model(torch.randn(4, 8)).pow(2).mean() * 1e-5, opt, scaler)
        return diag.run

    plain, scaled = train(False), train(True)
    assert scaled.loss_scales == {0: 2.0**10, 1: 2.0**11, 2: 2.0**12}  # growth_interval=1 grows each step
    assert plain.stats("0.weight", "param_grad").amax * 2**10 == scaled.stats("0.weight", "param_grad", 0).amax
    a, b = advise(plain), advise(scaled)
    assert (a.recommended, a.window) == (b.recommended, b.window)
    for k in range(-5, 40, 3):
        assert a.at(2.0**k) == b.at(2.0**k)


def test_when_no_scale_works_it_says_so_and_names_the_sites() -> None:
    run = record([torch.tensor([1e-12, 3e-13, 2e3, 1.5e3])])
    adv = advise(run, "fp16")
    assert adv.window is None
    assert adv.overflow_limiter == "w" and adv.underflow_limiter == "w"
    assert "no scale keeps underflow" in str(adv)
    assert adv.recommended == 2.0**4  # 2e3 * 2^(4+1) < 65520 <= 2e3 * 2^6


def test_nonfinite_gradients_are_reported_not_scaled_away() -> None:
    run = record([torch.tensor([1e-3, 2e-3]), torch.tensor([math.inf, 1.0]), torch.tensor([1e-3, 4e-3])])
    adv = advise(run)
    assert adv.nonfinite_steps == (1,)
    assert adv.at(2.0**-40).overflow  # step 1 overflows at any scale
    assert adv.recommended == 2.0**22  # from the finite steps: 4e-3 * 2^23 < 65520 <= 4e-3 * 2^24
    assert "NaN/inf" in str(adv)


def test_bf16_needs_no_scaling_for_ordinary_gradients() -> None:
    run = record([torch.randn(1000) * 1e-6])
    adv = advise(run, "bf16")
    assert adv.at(1.0).underflow == 0.0 and adv.window[0] <= 1.0 <= adv.window[1]


def test_bf16_needs_no_scaling_while_scale_1_is_in_the_window() -> None:
    grads = torch.full((16384,), 1e-3)
    grads[0] = 1e-42  # one gradient past even bf16's range: within the tolerated underflow
    adv = advise(record([grads]), "bf16")
    assert 0 < adv.at(1.0).underflow <= adv.max_underflow and adv.recommended == 1.0


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler('cpu') needs torch >= 2.3")
def test_steps_a_grad_scaler_skipped_bound_the_advice_even_when_every_gradient_was_inf() -> None:
    if not cpu_fp16_autocast():
        pytest.skip("this torch has no fp16 autocast on CPU")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)  # 0.5 * 2^20 overflows fp16 at the seed
    with mpdiag.diagnose(model, optimizer=opt, scaler=scaler) as diag:
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(torch.randn(4, 8))
            scaler.scale((out.float() * 0.5).sum()).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    adv = advise(diag.run, "fp16")
    assert adv.skipped_steps == (0, 1, 2) and adv.nonfinite_steps == ()
    assert adv.recommended is not None and adv.recommended < min(diag.run.loss_scales.values())


def test_per_site_outcomes_and_curves() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    with mpdiag.diagnose(model) as diag:
        (model(torch.randn(2, 4)).sum() * 1e-8).backward()
    adv = advise(diag.run)
    site = ("0.weight", "param_grad")
    # The site's outcome is that of its own gradients: the share of them that the real cast flushes to zero.
    grad = model[0].weight.grad
    real = [
        float((((grad * 2.0**k).to(torch.float16) == 0) & (grad != 0)).sum()) / grad.count_nonzero().item()
        for k in range(12)
    ]
    assert real[0] == 1 and any(0 < r < 1 for r in real)  # scales where some, not all, underflow: a share to get right
    assert [adv.at(2.0**k, site).underflow for k in range(12)] == pytest.approx(real)
    curve = adv.curve(site)
    assert len(curve) == len(adv.exponents)
    underflow = [o.underflow for o in curve]
    assert underflow == sorted(underflow, reverse=True)  # less underflow as the scale grows
    assert underflow[0] == 1.0 and curve[-1].overflow  # the range covers both ends


def test_most_demanding_sites_need_the_largest_scale() -> None:
    torch.manual_seed(0)
    run = record_sites(
        {
            "small": torch.randn(100) * 1e-9,
            "large": torch.randn(100),
            "mid": torch.randn(100) * 1e-5,
            "zero": torch.zeros(10),
        }
    )
    adv = advise(run, "fp16")
    assert [s.name for s in adv.most_demanding()] == ["small", "mid", "large"]  # no gradients: left out
    assert [s.name for s in adv.most_demanding(1)] == ["small"]
    # The order is the one the replay gives: the smallest scale at which each site's underflow is tolerable.
    needed = {
        s.name: next(k for k in adv.exponents if adv.at(2.0 ** int(k), s).underflow <= adv.max_underflow)
        for s in adv.sites
        if s.name != "zero"
    }
    assert sorted(needed, key=lambda n: -needed[n]) == ["small", "mid", "large"]


@given(st.lists(st.floats(-40, 10), min_size=1, max_size=48), st.integers(-10, 30), st.integers(0, 12))
def test_underflow_per_step_agrees_with_casting_at_each_scale(log2_magnitudes: list[float], k: int, shift: int) -> None:
    from mpdiag.analysis.gradients import underflow_per_step

    grads = torch.tensor([2.0**e for e in log2_magnitudes], dtype=torch.float32)
    run = record_sites({"w": grads}, scale=2.0**shift)  # recorded under a GradScaler: true gradients are /2^shift
    share = underflow_per_step(run, "fp16", {0: 2.0**k})[0]
    _, under, ties, nonzero = real_outcome([grads], k)
    assert round(share * nonzero) == under - ties


def test_fp64_gradients_far_past_fp32_range_are_advised_without_a_math_error() -> None:
    run = record_sites({"w": torch.tensor([1e300, 1e-300, 1.0], dtype=torch.float64)})
    for fmt in ("fp16", "bf16", "fp8_e4m3"):
        adv = advise(run, fmt)
        assert adv.at(1.0).overflow and adv.exponents[0] < adv.exponents[-1]


@pytest.mark.parametrize(
    "call, says",
    [
        (lambda adv: adv.at(3.0), r"a loss scale that is a power of two \(2.0\*\*k\), got 3.0"),
        (lambda adv: adv.at(0.0), r"a loss scale that is a power of two \(2.0\*\*k\), got 0.0"),
        (
            lambda adv: adv.at(1.0, ("nope", "param_grad")),
            r"'nope' \(param_grad\) is not a gradient site of this advice",
        ),
        (lambda adv: adv.at(1.0, ("w", "activation")), r"'w' \(activation\) is not a gradient site of this advice"),
    ],
)
def test_bad_questions_get_clear_errors(call, says: str) -> None:
    adv = advise(record([torch.tensor([1e-3])]))
    with pytest.raises(MpdiagError, match=says):
        call(adv)


def test_runs_without_gradients_and_bad_arguments() -> None:
    model = nn.Linear(2, 2)
    with torch.no_grad(), mpdiag.diagnose(model) as diag:
        model(torch.ones(1, 2))
    with pytest.raises(MpdiagError, match=r"no gradients .*; call backward\(\) while diagnose\(\) is attached"):
        advise(diag.run)
    run = record([torch.tensor([1.0])])
    with pytest.raises(MpdiagError, match="expected margin_bits >= 0"):
        advise(run, margin_bits=-1)
    with pytest.raises(MpdiagError, match=r"steps \[5\] were not recorded; recorded steps: \[0\]"):
        advise(run, steps=[5])
    assert np.all(np.diff(advise(run).exponents) == 1)
