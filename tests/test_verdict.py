"""Verdicts per format: the levels and facts they state, and per-tensor scaling against real fp8 casts."""

from __future__ import annotations

import math

import pytest
import torch
from gradient_runs import record_sites
from hypothesis import given
from hypothesis import strategies as st
from models import backward_and_step
from torch import nn

import mpdiag
from mpdiag.analysis.scaling import advise
from mpdiag.analysis.verdict import nonfinite_verdict, scaled_underflow, verdicts
from mpdiag.core import formats
from mpdiag.core.text import percent
from mpdiag.record._accumulate import tensor_stats


def train(
    model: nn.Module,
    inputs: list[torch.Tensor],
    loss_factor: float = 1.0,
    fmts: tuple[str, ...] = ("fp16", "bf16", "fp8_e4m3"),
) -> mpdiag.Run:
    with mpdiag.diagnose(model, formats=fmts) as diag:
        for x in inputs:
            model.zero_grad()
            (model(x).sum() * loss_factor).backward()
            diag.step()
    return diag.run


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def test_a_healthy_run_passes_in_16_bit_formats() -> None:
    run = train(small_model(), [torch.randn(4, 8) for _ in range(2)])
    by = {v.fmt: v for v in verdicts(run)}
    assert by["fp16"].level == by["bf16"].level == "ok"
    assert by["bf16"].sentence == "bf16: no site within 8 bits of max."
    assert by["fp16"].first_overflow_step is None and by["fp16"].recommended_scale is None
    assert nonfinite_verdict(run) is None


def test_overflow_names_the_sites_and_the_first_step() -> None:
    model = small_model()
    run = train(model, [torch.randn(4, 8), torch.randn(4, 8) * 1e6])  # past fp16's max from step 1 only
    fp16 = verdicts(run)[0]
    assert fp16.level == "fail" and fp16.first_overflow_step == 1
    assert fp16.overflow_sites[0] == "0 (activation)"
    assert fp16.sentence.startswith(f"fp16: {len(fp16.overflow_sites)} site(s) overflow, first at step 1")


def test_tiny_gradients_get_the_scale_the_replay_recommends() -> None:
    run = train(small_model(), [torch.randn(4, 8)], loss_factor=1e-10)
    fp16 = verdicts(run)[0]
    adv = advise(run, "fp16")
    assert fp16.level == "warn" and fp16.gradient_underflow == adv.at(1.0).underflow > 0.5
    assert fp16.recommended_scale == adv.recommended
    assert f"recommended scale 2^{int(math.log2(adv.recommended))}" in fp16.sentence
    assert verdicts(run)[1].level == "ok"  # bf16 keeps them


def test_nonfinite_values_are_located() -> None:
    x = torch.randn(4, 8)
    x[1, 2] = float("inf")
    run = train(small_model(), [torch.randn(4, 8), x])
    text = nonfinite_verdict(run)
    assert text is not None and text.startswith(
        "NaN/inf first appeared at step 1 in the forward pass, in 0 (activation)"
    )


def test_a_run_without_steps_is_refused() -> None:
    with pytest.raises(
        mpdiag.MpdiagError, match=r"no recorded steps; train at least one step with diagnose\(\) attached"
    ):
        verdicts(mpdiag.Run(formats=("fp16",)))


@pytest.mark.parametrize(
    "share, text", [(0.0, "0%"), (3e-5, "<0.01%"), (0.5, "50%"), (0.00123, "0.123%"), (1.0, "100%")]
)
def test_percent_never_rounds_a_loss_away(share: float, text: str) -> None:
    assert percent(share) == text


@given(st.lists(st.floats(-60, 30), min_size=1, max_size=48), st.sampled_from(["fp8_e4m3", "fp8_e5m2", "fp16"]))
def test_scaled_underflow_agrees_with_scaling_and_casting(log2_magnitudes: list[float], name: str) -> None:
    fmt = formats.get(name)
    x = torch.tensor([2.0**e for e in log2_magnitudes], dtype=torch.float32)
    stats = tensor_stats(x, (name,))
    # The scale per-tensor recipes use: the largest power of two keeping amax below the overflow threshold.
    k = max(k for k in range(-200, 200) if stats.amax * 2.0**k < fmt.overflow_threshold)
    scaled = x.double() * 2.0**k
    flushed = (scaled.to(torch.float32).to(fmt.dtype).to(torch.float32) == 0) & (x != 0)
    tie = fmt.min_subnormal / 2  # exactly half the smallest subnormal rounds to even: zero, a whole-bin edge case
    assert round(scaled_underflow(stats, fmt) * stats.finite_nonzero) == int((flushed & (scaled != tie)).sum())


def test_a_run_with_its_own_loss_scale_is_judged_at_that_scale() -> None:
    torch.manual_seed(0)
    run = record_sites({"w": torch.randn(1000) * 1e-9}, scale=2.0**16)  # as a GradScaler records them
    fp16 = verdicts(run)[0]
    assert fp16.gradient_underflow > 0.5  # true gradients: most flush to zero unscaled
    # The recorded (scaled) values are what fp16 got: their own flush count is the share at the run's scale.
    assert fp16.recorded_scale_underflow == run.stats("w", "param_grad").underflow("fp16") / 1000
    assert "the run's own loss scale (2^16) keeps that to" in fp16.sentence and fp16.recommended_scale is None


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler('cpu') needs torch >= 2.3")
def test_gradients_scaled_by_a_grad_scaler_are_not_judged_as_overflow() -> None:
    """A real GradScaler at 2^16 lifts true gradients of ~0.05 past fp8_e4m3's max: that is the loss scale's
    business (the advice judges true gradients), not an overflow of the run. Unscaled, the same recorded
    values would be judged as the run's own."""

    def run(scaled: bool) -> mpdiag.Run:
        model = small_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if scaled else None
        with mpdiag.diagnose(model, formats=("fp16", "fp8_e4m3"), optimizer=opt, scaler=scaler) as diag:
            for _ in range(2):
                opt.zero_grad()
                loss = model(torch.randn(4, 8)).sum()
                # Unscaled: the same recorded gradients, with no scale to divide out.
                backward_and_step(loss if scaled else loss * 2.0**16, opt, scaler)
        return diag.run

    scaled, unscaled = run(True), run(False)
    assert scaled.loss_scales and not unscaled.loss_scales
    grads_overflow = [
        s for s in scaled.sites if s.kind.value.endswith("grad") and scaled.stats(*s).overflow("fp8_e4m3")
    ]
    assert grads_overflow  # the recorded (scaled) gradients do reach e4m3's max
    e4m3 = {v.fmt: v for v in verdicts(scaled)}["fp8_e4m3"]
    assert not any("grad)" in label for label in e4m3.overflow_sites)
    assert e4m3.closest is None or not e4m3.closest.kind.endswith("grad")
    assert any("grad)" in label for label in {v.fmt: v for v in verdicts(unscaled)}["fp8_e4m3"].overflow_sites)


def test_a_run_that_held_nan_is_not_called_safe_in_any_format() -> None:
    x = torch.randn(4, 8)
    x[0, 0] = math.nan
    run = train(small_model(), [x])
    for v in verdicts(run):
        assert v.level in ("warn", "fail")
        assert "site(s) held NaN/inf, judged on their finite values only" in v.sentence
    assert nonfinite_verdict(run) is not None
