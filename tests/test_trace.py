"""trace_nonfinite(): the first operator producing NaN or inf, in forward or backward, post mortem."""

from __future__ import annotations

import math

import torch
from nonfinite_models import InfInBackward, Log
from torch import nn

import mpdiag
from mpdiag.probe.trace import trace_nonfinite


def test_a_nan_made_in_forward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Log(), nn.Linear(4, 2))
    origin = trace_nonfinite(model, lambda m, x: m(x).sum(), torch.randn(8, 4))
    assert (origin.op, origin.module, origin.phase, origin.inputs_finite) == ("aten.log.default", "1", "forward", True)
    assert origin.nans > 0 and origin.posinf == 0
    assert "return x.log()" in origin.stack[-1] and "nonfinite_models.py" in origin.stack[-1]
    assert "aten.log.default produced" in str(origin)


def test_an_inf_made_only_in_backward_with_the_forward_call_behind_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), InfInBackward(), nn.Linear(4, 2))
    origin = trace_nonfinite(model, lambda m, x: m(x).sum(), torch.randn(8, 4))
    assert (origin.op, origin.module, origin.phase) == ("aten.mul.Tensor", "1", "backward")
    assert origin.posinf + origin.neginf > 0 and origin.nans == 0
    assert "InfGradient.apply(x)" in origin.stack[-1]


def test_a_clean_batch_gives_none() -> None:
    assert trace_nonfinite(nn.Linear(3, 1), lambda m, x: m(x).pow(2).mean(), torch.randn(4, 3)) is None


def test_nan_in_the_batch_is_told_apart_from_a_nan_made_by_an_operator() -> None:
    batch = torch.ones(2, 3)
    batch[0, 0] = math.nan
    origin = trace_nonfinite(nn.Linear(3, 1), lambda m, x: m(x).sum(), batch)
    assert origin.module == "" and not origin.inputs_finite
    assert "already non-finite" in str(origin)


def test_a_nan_made_by_the_loss_function_is_outside_the_model() -> None:
    origin = trace_nonfinite(nn.Linear(3, 1), lambda m, x: (m(x) - 1e6).sqrt().sum(), torch.ones(2, 3))
    assert origin.op == "aten.sqrt.default" and origin.module is None and "outside the model" in str(origin)


def test_the_model_is_left_as_found_and_a_diagnosis_records_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), Log(), nn.Linear(8, 1)).train()
    x = torch.randn(16, 4)
    with mpdiag.diagnose(model) as diag:
        model(x.abs()).nan_to_num().sum().backward()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        grads = [(p.grad, p.grad.clone()) for p in model.parameters()]  # NaN in some: log of negatives
        rng = torch.get_rng_state()
        assert trace_nonfinite(model, lambda m, b: m(b).sum(), x) is not None
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        for (same, values), p in zip(grads, model.parameters()):
            assert p.grad is same and torch.allclose(values, p.grad, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(torch.get_rng_state(), rng)
        diag.step()
    assert diag.run.stats("0", "activation").calls == 1
