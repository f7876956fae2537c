"""Non-finite origins found while recording: events in execution order, producers vs receivers."""

from __future__ import annotations

import math

import pytest
import torch
from nonfinite_models import InfInBackward, Log
from torch import nn

import mpdiag
from mpdiag import NonFiniteError
from mpdiag.core.errors import MpdiagError, MpdiagWarning


@pytest.fixture(autouse=True)
def _both_paths(stats_path: str) -> None:
    """Events come from the host kernel's counts or from device tensors read at the close: test both."""


def nan_model(bias: float | None = None) -> nn.Sequential:
    """Linear -> log -> Linear: NaN wherever the first layer's output is negative. With a large
    positive bias and inputs in [0, 1) it never is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Log(), nn.Linear(4, 2))
    if bias is not None:
        with torch.no_grad():
            model[0].bias.fill_(bias)
    return model


def test_forward_nan_is_traced_to_the_module_that_made_it() -> None:
    model = nan_model()
    with mpdiag.diagnose(model) as diag:
        model(torch.randn(8, 4)).sum().backward()
        diag.step()
    run = diag.run
    first = run.first_nonfinite(phase="forward")
    assert (first.step, first.name, first.kind, first.phase, first.produced) == (0, "1", "activation", "forward", True)
    assert first.nans > 0 and first.posinf == first.neginf == 0
    receivers = [e for e in run.nonfinite_events() if e.phase == "forward" and not e.produced]
    assert [e.name for e in receivers] == ["2", ""]  # downstream, in execution order
    assert run.first_nonfinite() == first  # forward comes before backward
    assert "first seen here" in str(first) and "activation of 1" in str(first)


def test_an_inf_made_only_in_backward_is_found() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), InfInBackward(), nn.Linear(4, 2))
    with mpdiag.diagnose(model) as diag:
        model(torch.randn(8, 4)).sum().backward()
        diag.step()
    run = diag.run
    assert run.first_nonfinite(phase="forward") is None
    first = run.first_nonfinite()
    assert (first.name, first.kind, first.phase, first.produced) == ("0", "activation_grad", "backward", True)
    assert first.posinf + first.neginf > 0
    later = {(e.name, e.kind) for e in run.nonfinite_events()[1:]}
    assert ("0.weight", "param_grad") in later and ("2.weight", "param_grad") not in later


def test_clean_steps_have_no_events_and_steps_are_told_apart() -> None:
    model = nan_model(bias=100.0)
    with mpdiag.diagnose(model) as diag:
        for x in (torch.rand(8, 4), torch.full((8, 4), -1000.0), torch.rand(8, 4)):
            model.zero_grad()
            model(x).sum().backward()
            diag.step()
    run = diag.run
    assert {e.step for e in run.nonfinite_events()} == {1}
    assert run.first_nonfinite().step == 1 and run.first_nonfinite(step=1).name == "1"
    assert run.first_nonfinite(step=0) is None and run.first_nonfinite(step=2) is None
    with pytest.raises(MpdiagError, match="phase must be one of forward, backward, optimizer or None, got 'sideways'"):
        run.first_nonfinite(phase="sideways")
    with pytest.raises(MpdiagError, match="step 99 was not recorded; recorded steps: 0-2"):
        run.first_nonfinite(step=99)


def test_a_nonfinite_parameter_is_where_the_forward_starts() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with torch.no_grad():
        model[1].weight[0, 0] = math.nan
    with mpdiag.diagnose(model) as diag:
        model(torch.ones(1, 2)).sum().backward()
        diag.step()
    first = diag.run.first_nonfinite()
    assert (first.name, first.kind, first.seq, first.produced) == ("1.weight", "param", -1, True)


def test_warn_names_the_origin() -> None:
    model = nan_model()
    with mpdiag.diagnose(model, on_nonfinite="warn") as diag:
        model(torch.randn(8, 4)).sum().backward()
        with pytest.warns(
            MpdiagWarning, match=r"non-finite values at step 0, forward: .* in activation of 1 \(first seen"
        ):
            diag.step()


def test_raise_carries_the_origin_and_a_flight_recorder() -> None:
    model = nan_model(bias=100.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with mpdiag.diagnose(model, optimizer=opt, on_nonfinite="raise") as diag:
        for _ in range(3):
            opt.zero_grad()
            model(torch.rand(8, 4)).sum().backward()
            opt.step()
        opt.zero_grad()
        model(torch.full((8, 4), -1000.0)).sum().backward()  # log of negatives
        with pytest.raises(
            NonFiniteError,
            match=r"non-finite values at step 3, forward: \d+ NaN in activation of 1 "
            r"\(first seen here\)",
        ) as info:
            opt.step()
        err = info.value
        assert (err.event.name, err.event.kind, err.event.step) == ("1", "activation", 3)
        history = err.history[("1", "activation")]
        assert [s for s, _ in history][-1] == 3 and history[-1][1].nans > 0
        assert "step 3" in str(err) and "amax" in str(err)
        assert diag.run.steps[-1] == 3  # the step was recorded before raising
        opt.zero_grad()
        model(torch.rand(8, 4)).sum().backward()
        opt.step()  # recording goes on
    assert diag.run.steps[-1] == 4


def test_on_nonfinite_is_validated() -> None:
    with pytest.raises(MpdiagError, match="on_nonfinite must be one of 'record', 'warn', 'raise', got 'explode'"):
        mpdiag.diagnose(nn.Linear(2, 2), on_nonfinite="explode")
