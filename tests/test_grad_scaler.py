"""The GradScaler replay: its update rule against a real torch GradScaler, and its use on runs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import mpdiag
from mpdiag.analysis.grad_scaler import scaler_trajectory, simulate_grad_scaler
from mpdiag.core.errors import MpdiagError, MpdiagWarning

needs_cpu_scaler = pytest.mark.skipif(
    not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler('cpu') needs torch >= 2.3"
)


def real_trajectory(peaks: list[float], threshold: float, **params) -> tuple[list[float], list[bool], float]:
    """A real GradScaler fed gradients that are inf exactly when peak * scale >= threshold."""
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.0)
    stepped: list[int] = []
    opt.register_step_post_hook(lambda *_: stepped.append(1))
    scaler = torch.amp.GradScaler("cpu", **params)
    scales, skipped = [], []
    for peak in peaks:
        scaler.scale(torch.ones(()))  # initialises the scale tensor, as scaling a loss does
        scale = scaler.get_scale()
        scales.append(scale)
        before = len(stepped)
        param.grad = torch.tensor([math.inf if peak * scale >= threshold else peak * scale])
        scaler.step(opt)
        scaler.update()
        skipped.append(len(stepped) == before)
    return scales, skipped, scaler.get_scale()


@needs_cpu_scaler
@given(
    peaks=st.lists(st.sampled_from([1e-3, 0.05, 0.9, 2.0, 40.0, math.inf]), min_size=1, max_size=40),
    interval=st.integers(1, 4),
    growth=st.sampled_from([2.0, 1.5, 4.0]),
    backoff=st.sampled_from([0.5, 0.25, 0.7]),
)
def test_update_rule_is_torchs(peaks: list[float], interval: int, growth: float, backoff: float) -> None:
    params = {"init_scale": 2.0**15, "growth_interval": interval, "growth_factor": growth, "backoff_factor": backoff}
    want = real_trajectory(peaks, 65520.0, **params)
    got = scaler_trajectory(lambda i, scale: peaks[i] * scale >= 65520.0, len(peaks), **params)
    assert got == want


def test_hysteresis_min_and_max_scale() -> None:
    always = scaler_trajectory(lambda i, s: True, 4, init_scale=8.0, hysteresis=2, min_scale=2.0)
    assert always == ([8.0, 8.0, 4.0, 2.0], [True] * 4, 2.0)  # one overflow tolerated, then back off to the floor
    never = scaler_trajectory(lambda i, s: False, 5, init_scale=2.0**23, growth_interval=1, max_scale=2.0**24)
    assert never[0] == [2.0**23, 2.0**24, 2.0**24, 2.0**24, 2.0**24]
    # growth resets the hysteresis budget (DeepSpeed); a second overflow right after still only counts once
    mixed = scaler_trajectory(lambda i, s: i in (0, 2), 4, init_scale=4.0, hysteresis=2, growth_interval=1)
    assert mixed[0] == [4.0, 4.0, 8.0, 8.0]


def record(peaks: list[float], every: int = 1) -> mpdiag.Run:
    param = nn.Parameter(torch.zeros(2))
    holder = nn.Module()
    holder.register_parameter("w", param)
    with mpdiag.diagnose(holder, every=every) as diag:
        for peak in peaks:
            param.grad = torch.tensor([peak, peak / 8])
            diag.step()
    return diag.run


def test_simulation_on_a_run_skips_exactly_where_gradients_overflow() -> None:
    peaks = [0.5, 0.5, 3.0, 0.01, 0.01, 0.01, 0.01]
    sim = simulate_grad_scaler(record(peaks), init_scale=2.0**17, growth_interval=2)
    assert sim.steps == tuple(range(7))
    assert list(sim.skipped) == [p * s >= 65520 for p, s in zip(peaks, sim.scales)]
    assert sim.scales == (2.0**17, 2.0**16, 2.0**16, 2.0**15, 2.0**15, 2.0**16, 2.0**16)
    assert sim.final_scale == 2.0**17 and sim.total_skipped == 2 and sim.skipped_steps == [0, 2]
    assert "2 skipped" in str(sim)


def test_a_step_with_nonfinite_gradients_is_always_skipped() -> None:
    sim = simulate_grad_scaler(record([1e-3, math.nan, 1e-3]), init_scale=1.0)
    assert sim.skipped == (False, True, False)


def test_warns_when_not_every_step_was_recorded() -> None:
    with pytest.warns(MpdiagWarning, match="approximate: record with every=1 to replay it exactly"):
        sim = simulate_grad_scaler(record([0.1] * 6, every=2))
    assert sim.approximate and sim.steps == (0, 2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not simulate_grad_scaler(record([0.1] * 3)).approximate


def test_bad_parameters() -> None:
    with pytest.raises(MpdiagError, match="expected .*growth_factor > 1"):
        simulate_grad_scaler(record([0.1]), growth_factor=1.0)
    with pytest.raises(MpdiagError, match="expected .*hysteresis >= 1"):
        scaler_trajectory(lambda i, s: False, 1, hysteresis=0)
