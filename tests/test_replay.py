"""replay_loss_scale(): real autocast backwards at several scales, compared with advise()."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch_support import cpu_fp16_autocast

import mpdiag
from mpdiag.analysis.scaling import advise
from mpdiag.core.errors import MpdiagError
from mpdiag.probe.replay import replay_loss_scale

needs_fp16_autocast = pytest.mark.skipif(not cpu_fp16_autocast(), reason="this torch has no fp16 CPU autocast")


def mean_square(scale: float):
    return lambda model, batch: model(batch).float().pow(2).mean() * scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@needs_fp16_autocast
def test_the_model_and_random_streams_are_left_as_found() -> None:
    torch.manual_seed(0)
    model = Net().train()
    x = torch.randn(32, 8)
    mean_square(1.0)(model, x).backward()  # the caller has gradients of their own
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    res = replay_loss_scale(model, mean_square(1e-3), x, [1.0, 2.0**8, 2.0**16])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # params, BN running stats
    assert all(torch.equal(g, p.grad) for (n, p), g in zip(model.named_parameters(), grads.values()))
    assert torch.equal(torch.get_rng_state(), rng)
    # the same dropout masks in every run: at a safe scale nothing the reference had is zero in the replay
    assert res.at(2.0**8).underflow < 1e-3
    assert not res.at(2.0**16).overflow


def _power_of_two_batch() -> torch.Tensor:
    return torch.tensor([[2.0**-j for j in range(0, 24, 2)]])  # exact in fp16, at most 1 in magnitude


@needs_fp16_autocast
def test_agrees_with_advise_where_no_fp16_intermediate_decides() -> None:
    # One linear layer: the weight gradient is (scale * c) * x, formed in fp16 from the output gradient
    # scale * c, which underflows only where every weight gradient does too (|x| <= 1).
    model = nn.Linear(12, 1, bias=False)
    x, c = _power_of_two_batch(), 2.0**-30
    with mpdiag.diagnose(model) as diag:
        (model(x).sum() * c).backward()
    predicted = advise(diag.run, "fp16")
    scales = [2.0**k for k in range(0, 30, 2)]
    measured = replay_loss_scale(model, lambda m, b: m(b).float().sum() * c, x, scales)
    for scale in scales:
        for site in (("weight", "param_grad"), ("", "activation_grad")):
            assert measured.at(scale, site).underflow == pytest.approx(predicted.at(scale, site).underflow), scale


@needs_fp16_autocast
def test_explains_where_an_fp16_activation_gradient_underflows_first() -> None:
    # Two layers, a large input: the first layer's weight gradient (tiny * w2 * x) would be representable,
    # but it is computed from the hidden activation's gradient (tiny * w2), which flushes to zero in fp16.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[1].weight.fill_(2.0**-4)
    x = torch.full((1, 4), 2.0**10)
    loss_fn = lambda m, b: m(b).float().sum() * 2.0**-24  # noqa: E731
    with mpdiag.diagnose(model) as diag:
        loss_fn(model, x).backward()
    predicted = advise(diag.run, "fp16").at(1.0, ("0.weight", "param_grad"))
    measured = replay_loss_scale(model, loss_fn, x, [1.0])
    assert predicted.underflow == 0.0  # 2^-24 * 2^-4 * 2^10 = 2^-18: a normal fp16 value
    assert measured.at(1.0, ("0.weight", "param_grad")).underflow == 1.0
    assert measured.at(1.0, ("0", "activation_grad")).underflow == 1.0  # why: 2^-28 underflows first


@needs_fp16_autocast
def test_an_attached_diagnosis_records_none_of_the_replay() -> None:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(16, 8)
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        opt.zero_grad()
        mean_square(1.0)(model, x).backward()
        replay_loss_scale(model, mean_square(1.0), x, [1.0, 4.0])
        opt.step()
    assert diag.run.steps == [0]
    assert diag.run.stats("body.0", "activation").calls == 1


@needs_fp16_autocast
def test_overflow_is_detected_and_named() -> None:
    model = nn.Linear(4, 1)
    res = replay_loss_scale(model, mean_square(1.0), torch.full((2, 4), 100.0), [1.0, 2.0**30])
    assert not res.at(1.0).overflow
    big = res.at(2.0**30)
    assert big.overflow and "weight" in big.overflow_sites


def test_an_autocast_this_torch_cannot_do_is_refused() -> None:
    if cpu_fp16_autocast():
        pytest.skip("this torch runs fp16 autocast on the CPU")
    with pytest.raises(MpdiagError, match="autocast on 'cpu' (is not available here|does not run matmuls in)"):
        replay_loss_scale(nn.Linear(2, 1), mean_square(1.0), torch.ones(1, 2), [1.0])


@needs_fp16_autocast
def test_bad_arguments() -> None:
    model = nn.Linear(2, 1)
    x = torch.ones(1, 2)
    with pytest.raises(MpdiagError, match=r"expected positive loss scales, got \[\]"):
        replay_loss_scale(model, mean_square(1.0), x, [])
    with pytest.raises(MpdiagError, match="loss_fn must return a scalar loss tensor"):
        replay_loss_scale(model, lambda m, b: m(b), torch.ones(3, 2), [1.0])
    with pytest.raises(MpdiagError, match=r"torch.float16 or torch.bfloat16 \(an autocast dtype\), got torch.float32"):
        replay_loss_scale(model, mean_square(1.0), x, [1.0], dtype=torch.float32)
    with pytest.raises(MpdiagError, match=r"scale 2.0 was not replayed; replayed scales: \[1.0\]"):
        replay_loss_scale(model, mean_square(1.0), x, [1.0]).at(2.0)
    with pytest.raises(MpdiagError, match="replay_loss_scale expects a torch.nn.Module, got str"):
        replay_loss_scale("model", mean_square(1.0), x, [1.0])
