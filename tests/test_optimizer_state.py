"""The optimizer's side as sites: after each recorded step, every floating state tensor of every observed
parameter, and each parameter's update, exactly as ``tensor_stats`` of those tensors taken by hand, for
any optimizer; observing them never changes training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mpdiag
from mpdiag.core.run import Kind

STEPS = 3


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 2))


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 8, generator=g) for _ in range(STEPS)]


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True),
}


def _train(make, **options):  # noqa: ANN001, ANN003, ANN202
    """Train STEPS steps with diagnose attached; after each step, tensor_stats of every state tensor by hand."""
    model = _model()
    opt = make(model.parameters())
    names = {p: n for n, p in model.named_parameters()}
    by_hand = []
    with mpdiag.diagnose(model, optimizer=opt, **options) as diag:
        for x in _batches():
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            by_hand.append(
                {
                    f"{names[p]}.{key}": mpdiag.tensor_stats(t)
                    for p, state in opt.state.items()
                    for key, t in state.items()
                    if t.is_floating_point() and t.dim() > 0
                }
            )
    return model, diag.run, by_hand


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_sites_equal_the_state_tensors_measured_by_hand_after_each_step(name: str) -> None:
    try:
        _, run, by_hand = _train(OPTIMIZERS[name])
    except RuntimeError as err:  # fused Adam on a CPU needs torch >= 2.4
        pytest.skip(f"{name} does not run here: {err}")
    assert run.steps == list(range(STEPS))
    for step, expected in enumerate(by_hand):
        recorded = {s.name: st for s, st in run.records[step].items() if s.kind == Kind.OPTIMIZER_STATE}
        assert recorded == expected
    assert expected  # every optimizer here keeps some state


def test_fused_foreach_and_plain_adam_give_the_same_state_statistics() -> None:
    plain = _train(OPTIMIZERS["adam"])[1]
    foreach = _train(OPTIMIZERS["adam-foreach"])[1]
    assert plain.sites == foreach.sites
    assert all(plain.stats(s.name, s.kind) == foreach.stats(s.name, s.kind) for s in plain.sites)


def test_adams_names_and_the_step_count_left_out() -> None:
    _, run, _ = _train(OPTIMIZERS["adamw-amsgrad"])
    state = sorted(s.name for s in run.sites if s.kind == Kind.OPTIMIZER_STATE)
    assert state[:3] == ["0.bias.exp_avg", "0.bias.exp_avg_sq", "0.bias.max_exp_avg_sq"]
    assert len(state) == 3 * len(list(_model().parameters()))  # no ".step": a 0-dim count, not values
    assert run.stats("3.weight.exp_avg_sq", "optimizer_state").numel == 32 * STEPS


def test_observing_the_state_never_changes_training() -> None:
    def final(**options):  # noqa: ANN003, ANN202
        model, _, _ = _train(OPTIMIZERS["adamw-amsgrad"], **options)
        return [p.detach().clone() for p in model.parameters()]

    model = _model()
    opt = OPTIMIZERS["adamw-amsgrad"](model.parameters())
    for x in _batches():
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    plain = [p.detach() for p in model.parameters()]
    for recorded in (final(), final(optimizer_state=False, updates=False)):
        assert all(torch.equal(a, b) for a, b in zip(recorded, plain))


def test_state_is_left_out_when_asked_on_unrecorded_steps_and_outside_include() -> None:
    _, run, _ = _train(OPTIMIZERS["adam"], optimizer_state=False)
    assert not any(s.kind == Kind.OPTIMIZER_STATE for s in run.sites)
    _, run, _ = _train(OPTIMIZERS["adam"], every=2)
    assert run.steps == [0, 2] and all(
        any(s.kind == Kind.OPTIMIZER_STATE for s in run.records[step]) for step in run.steps
    )
    _, run, _ = _train(OPTIMIZERS["adam"], include="3")
    assert {s.name.rsplit(".", 1)[0] for s in run.sites if s.kind == Kind.OPTIMIZER_STATE} == {"3.weight", "3.bias"}
    with pytest.raises(mpdiag.MpdiagError, match="optimizer_state must be True or False"):
        mpdiag.diagnose(_model(), optimizer_state="yes")  # type: ignore[arg-type]


def test_a_nan_in_the_state_is_an_event_of_the_optimizer_phase() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        for step, x in enumerate(_batches()):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            if step == 0:
                opt.state[model[3].weight]["momentum_buffer"][0, 0] = float("nan")  # as a faulty kernel would
    events = [e for e in diag.run.nonfinite_events() if e.kind == Kind.OPTIMIZER_STATE]
    # step 1's momentum is 0.9 times that NaN plus the gradient: seen when step 1's step() returns
    assert events and events[0].step == 1 and events[0].phase == "optimizer" and events[0].produced
    assert events[0].name == "3.weight.momentum_buffer" and events[0].nans == 1
    assert not [e for e in diag.run.nonfinite_events() if e.step == 1 and e.phase != "optimizer"]


def _train_under_an_overflowing_grad_scaler() -> mpdiag.Run:
    """fp16 autocast with Adam under a GradScaler whose scale overflows: its first steps are skipped."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    with mpdiag.diagnose(model, optimizer=opt, scaler=scaler) as diag:
        for x in _batches():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(x).float().pow(2).mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return diag.run


def test_gradscaler_skipped_steps_have_no_state_before_adams_first_real_step() -> None:
    run = _train_under_an_overflowing_grad_scaler()
    assert run.steps == list(range(STEPS))
    skipped = [s for s in run.steps if not any(site.kind == Kind.OPTIMIZER_STATE for site in run.records[s])]
    assert skipped and skipped == list(range(len(skipped)))  # no state before Adam's first real step


class _Failing(torch.optim.SGD):
    """SGD whose step() raises once asked to: after the pre-hook, before the post-hook."""

    fail = False

    def step(self, closure=None):  # noqa: ANN001, ANN201
        if self.fail:
            raise RuntimeError("boom")
        return super().step(closure)


def test_a_step_that_raised_closes_at_the_next_forward_and_training_goes_on() -> None:
    model = _model()
    opt = _Failing(model.parameters(), lr=0.1, momentum=0.9)
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        for step, x in enumerate(_batches()):
            opt.fail = step == 0
            opt.zero_grad()
            model(x).sum().backward()
            try:
                opt.step()
            except RuntimeError:
                assert step == 0
    run = diag.run
    assert run.steps == [0, 1, 2]
    assert run.stats("3.weight", "param", step=0).calls == 1  # observed when step() began
    assert not any(s.kind == Kind.OPTIMIZER_STATE for s in run.records[0])  # the failed step() made none
    assert Kind.OPTIMIZER_STATE in {s.kind for s in run.records[1]}


def test_the_verdicts_say_which_state_would_not_fit_a_format_and_leave_the_level_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with mpdiag.diagnose(model, optimizer=opt, formats=("fp16", "bf16")) as diag:
        opt.zero_grad()  # one step: the verdict's statistics are those of the state as it is now
        (model(torch.randn(8, 64)).pow(2).mean() * 1e-2).backward()
        opt.step()
    fp16, bf16 = mpdiag.verdicts(diag.run)
    keys = {key: (n, total) for key, n, total, _, _ in fp16.optimizer_state}

    def loses(t: torch.Tensor) -> bool:  # a real cast: non-zero values that fp16 turns into 0 or inf
        nonzero = t[t != 0]
        cast = nonzero.to(torch.float16)
        return bool(((cast == 0) | cast.isinf()).sum() > 1e-3 * nonzero.numel())

    # squared gradients of ~1e-4 are ~1e-8: below fp16's smallest subnormal (6e-8)
    expected = sum(loses(opt.state[p]["exp_avg_sq"]) for p in model.parameters())
    assert keys["exp_avg_sq"] == (expected, 4) and expected > 0
    assert f"exp_avg_sq of {expected} of 4 parameters would lose values" in fp16.sentence
    assert bf16.optimizer_state == ()  # bf16 has fp32's range
    records = {
        step: {site: v for site, v in record.items() if site.kind != Kind.OPTIMIZER_STATE}
        for step, record in diag.run.records.items()
    }
    without = {v.fmt: v.level for v in mpdiag.verdicts(mpdiag.Run(formats=diag.run.formats, records=records))}
    assert {v.fmt: v.level for v in (fp16, bf16)} == without


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=str)
def test_update_sites_are_the_new_weights_minus_the_old_exactly(weights: torch.dtype) -> None:
    model = _model().to(weights)  # bf16: real pure-bf16 training, the parameters themselves in bf16
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    by_hand = []
    with mpdiag.diagnose(model, optimizer=opt, every=2) as diag:
        for x in _batches():
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.zero_grad()
            model(x.to(weights)).float().pow(2).mean().backward()
            opt.step()
            by_hand.append(
                {n: mpdiag.tensor_stats(p.detach().double() - before[n].double()) for n, p in model.named_parameters()}
            )
    run = diag.run
    assert run.steps == [0, 2]
    for step in run.steps:
        recorded = {s.name: st for s, st in run.records[step].items() if s.kind == Kind.UPDATE}
        assert recorded == by_hand[step]
    # the difference of two fp32 (or bf16) values is exact in fp64
    assert run.stats("3.weight", "update", step=0).dtypes == {"float64"}


def test_updates_are_left_out_when_asked_and_for_steps_the_gradscaler_skipped() -> None:
    _, run, _ = _train(OPTIMIZERS["adam"], updates=False)
    assert not any(s.kind == Kind.UPDATE for s in run.sites)
    assert any(s.kind == Kind.OPTIMIZER_STATE for s in run.sites)
    skipped = _train_under_an_overflowing_grad_scaler()
    assert not any(s.kind == Kind.UPDATE for step in skipped.steps for s in skipped.records[step])
    with pytest.raises(mpdiag.MpdiagError, match="updates must be True or False"):
        mpdiag.diagnose(_model(), updates=1)  # type: ignore[arg-type]


def test_the_summary_ranks_the_models_sites_and_the_analysis_keeps_every_site() -> None:
    _, run, _ = _train(OPTIMIZERS["adam"])
    analysis = mpdiag.analyse(run)
    kinds = {r.site.kind for r in analysis.riskiest["fp16"]}
    assert {Kind.OPTIMIZER_STATE, Kind.UPDATE} <= kinds  # every site, for the report's table
    assert not {r.site.kind for r in analysis.model_riskiest["fp16"]} & {Kind.OPTIMIZER_STATE, Kind.UPDATE}
    assert len(analysis.model_riskiest["fp16"]) == len(analysis.riskiest["fp16"]) - sum(
        1 for s in run.sites if s.kind.is_optimizer
    )
    text = mpdiag.summary(run, analysis=analysis)
    assert "optimizer_state" not in text.split("riskiest sites per format", 1)[1]
