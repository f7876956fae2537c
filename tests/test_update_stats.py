"""What each optimizer step did to each parameter (``run.update_stats``), against the real thing: the
stalled counts against real low-precision weights given the same update, what pure-bf16 training really
lost against its weights before and after, Adam's eps share against its own state, the ratio histogram
against ``math.frexp`` per element."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sqlite3
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from host_reads import CountHostReads
from torch import nn

import mpdiag
import mpdiag.record._cpu_updates
import mpdiag.record._updates
from mpdiag.core.errors import MpdiagError, UnknownSiteError
from mpdiag.core.formats import get as get_format
from mpdiag.core.run import Kind
from mpdiag.core.updates import RATIO_BINS, RATIO_LOW, UpdateStats
from mpdiag.record._updates import count_update, decode, second_moments, stall_formats

STEPS = 3


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))
    nn.init.zeros_(model[0].bias)  # updates from zero: no ratio
    return model.to(dtype)


class Snapshot(NamedTuple):
    """One parameter in one step, taken by hand: its weight before and after, its gradient, the
    optimizer's state after the step and the parameter's group."""

    before: torch.Tensor
    after: torch.Tensor
    grad: torch.Tensor
    state: dict[str, torch.Tensor]
    group: dict[str, Any]


def _train(model: nn.Module, make_opt, **options):  # noqa: ANN001, ANN003, ANN202
    """STEPS steps diagnosed; returns the run and, per step, a Snapshot of each parameter."""
    opt = make_opt(model.parameters())
    groups = {p: g for g in opt.param_groups for p in g["params"]}
    g = torch.Generator().manual_seed(1)
    steps = []
    with mpdiag.diagnose(model, optimizer=opt, **options) as diag:
        for _ in range(STEPS):
            opt.zero_grad()
            x = torch.randn(16, 8, generator=g).to(next(model.parameters()).dtype)
            model(x).float().pow(2).mean().backward()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.step()
            steps.append(
                {
                    n: Snapshot(
                        before[n],
                        p.detach().clone(),
                        p.grad.clone(),
                        {k: t.clone() for k, t in opt.state[p].items()},
                        groups[p],
                    )
                    for n, p in model.named_parameters()
                }
            )
    return diag.run, steps


def _adam(lr: float = 1e-4, **kw):  # noqa: ANN003, ANN202
    return lambda params: torch.optim.Adam(params, lr=lr, **kw)


def test_stalled_counts_equal_real_narrow_weights_given_the_same_update() -> None:
    run, steps = _train(_model(), _adam(lr=3e-3))
    some_stalled = set()
    for step, per_param in enumerate(steps):
        for name, snap in per_param.items():
            u, before = run.update_stats(name, step), snap.before
            update = snap.after.double() - before.double()
            changed = update != 0
            assert u.nonzero == int(changed.sum()) and u.numel == before.numel()
            assert set(u.stalled) == {"fp16", "bf16"}  # the 16-bit formats: no weight is stored in fp8
            for fmt in ("fp16", "bf16"):  # a real weight of that dtype, given the update by torch's own add
                narrow = before.to(get_format(fmt).dtype)
                moved = narrow.clone().add_(update.float())
                assert u.stalled[fmt] == int((changed & (moved == narrow)).sum()), (step, name, fmt)
                some_stalled.add(0 < u.stalled[fmt] < u.nonzero)
    assert True in some_stalled  # the learning rate puts some updates on either side of the half-ulp


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_the_counting_is_exact_for_any_format_asked_fp8_too(fmt: str) -> None:
    """Weights are not stored in fp8, but the counting takes any format: element by element, real casts."""
    g = torch.Generator().manual_seed(0)
    before = torch.randn(300, generator=g) * torch.logspace(-3, 3, 300)
    update = (before.double() * torch.randn(300, generator=g, dtype=torch.float64) * 0.2).float().double()
    dtype = get_format(fmt).dtype
    lost = 0
    for b, d in zip(before.tolist(), update.tolist()):
        stored = torch.tensor(b).to(dtype).float()
        back = (stored + torch.tensor(d, dtype=torch.float32)).to(dtype).float()
        lost += d != 0 and bool(back == stored) and math.isfinite(stored.item())
    mpdiag.record._cpu_updates.finish_compiling()
    for kernel in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            if not kernel:
                patch.setattr(mpdiag.record._cpu_updates, "available", lambda weight: False)
            counts = count_update(before, update, None, (get_format(fmt),), None)
        assert decode("w", "float32", (get_format(fmt),), counts.numpy()).stalled == {fmt: lost}
    assert 0 < lost < 300


def test_bf16_weights_count_what_pure_bf16_training_really_lost() -> None:
    run, steps = _train(_model(torch.bfloat16), _adam(lr=1e-4))
    shares = []
    for step, per_param in enumerate(steps):
        for name, (before, after, grad, _, _) in per_param.items():
            u = run.update_stats(name, step)
            assert u.dtype == "bfloat16" and u.stalled == {}  # no 16-bit format narrower than bf16
            assert u.grad_nonzero == int((grad != 0).sum())
            assert u.lost == int(((grad != 0) & (after == before)).sum()), (step, name)
            assert u.nonzero == int((after != before).sum())
            shares.append(u.lost_share)
    assert max(shares) > 0.3  # lr 1e-4 against weights near 0.1: bf16 rounds most of Adam's steps away


@pytest.mark.parametrize(
    "make_opt",
    [_adam(lr=1e-2, eps=1e-3), lambda p: torch.optim.AdamW(p, lr=1e-2, eps=1e-3, amsgrad=True)],
    ids=["adam", "adamw-amsgrad"],
)
def test_the_eps_share_is_where_eps_exceeds_the_bias_corrected_second_moments_root(make_opt) -> None:  # noqa: ANN001
    run, steps = _train(_model(), make_opt)
    shares = []
    for step, per_param in enumerate(steps):
        for name, snap in per_param.items():
            v = snap.state["max_exp_avg_sq" if snap.group["amsgrad"] else "exp_avg_sq"].double()
            t = float(snap.state["step"])
            corrected = (v / (1 - snap.group["betas"][1] ** t)).sqrt()
            u = run.update_stats(name, step)
            assert u.eps_dominated == int((corrected < snap.group["eps"]).sum()), (step, name)
            shares.append(u.eps_share)
    assert any(0 < s < 1 for s in shares)  # eps 1e-3 dominates some elements, not all


def test_optimizers_without_eps_have_no_eps_share() -> None:
    run, _ = _train(_model(), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    assert all(run.update_stats(name).eps_dominated is None for name in run.updated_params)
    assert run.update_stats("2.weight").eps_share is None


def test_the_ratio_histogram_is_frexp_of_each_elements_update_over_its_weight() -> None:
    run, steps = _train(_model(), _adam(lr=3e-3))
    for step, per_param in enumerate(steps):
        for name, snap in per_param.items():
            counts, from_zero = [0] * RATIO_BINS, 0
            for b, a in zip(snap.before.reshape(-1).tolist(), snap.after.reshape(-1).tolist()):
                if a == b:
                    continue
                if b == 0:
                    from_zero += 1
                    continue
                _, exponent = math.frexp(abs(a - b) / abs(b))  # fp32 values: their fp64 difference is exact
                counts[min(max(exponent - 1 - RATIO_LOW, 0), RATIO_BINS - 1)] += 1
            u = run.update_stats(name, step)
            assert (list(u.ratio_counts), u.from_zero) == (counts, from_zero), (step, name)
    assert run.update_stats("0.bias", 0).from_zero == 32  # a bias initialised to zero moves from zero
    assert 0 < run.update_stats("0.weight").share_below(-9) < 1  # Adam's steps near lr against weights near 0.2


def test_update_stats_over_every_step_sum_the_steps_and_bad_names_are_explained() -> None:
    run, _ = _train(_model(), _adam(lr=3e-3))
    per_step = [run.update_stats("2.weight", s) for s in run.steps]
    total = run.update_stats("2.weight")
    assert total.steps == STEPS and total.numel == STEPS * 32 * 4
    assert total.nonzero == sum(u.nonzero for u in per_step)
    assert total.stalled == {f: sum(u.stalled[f] for u in per_step) for f in total.stalled}
    assert total.ratio_counts == tuple(map(sum, zip(*(u.ratio_counts for u in per_step))))
    assert total.eps_dominated == sum(u.eps_dominated for u in per_step)
    assert UpdateStats.from_dict(json.loads(json.dumps(total.as_dict()))) == total
    with pytest.raises(UnknownSiteError, match="2.weight"):
        run.update_stats("2.weigth")
    with pytest.raises(MpdiagError, match="step 7 was not recorded"):
        run.update_stats("2.weight", 7)
    with pytest.raises(MpdiagError, match="no stalled count for 'fp32'"):
        total.stalled_share("fp32")


def test_counting_in_chunks_counts_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    mpdiag.record._cpu_updates.finish_compiling()
    whole, _ = _train(_model(), _adam(lr=3e-3, eps=1e-3))  # on the CPU, the compiled kernel where numba is
    monkeypatch.setattr(mpdiag.record._cpu_updates, "available", lambda weight: False)  # the torch path...
    monkeypatch.setattr(mpdiag.record._updates, "CHUNK", 7)  # ...in chunks that split every parameter unevenly
    chunked, _ = _train(_model(), _adam(lr=3e-3, eps=1e-3))
    assert chunked.updates == whole.updates


def test_what_fp32_weights_predict_for_bf16_is_what_pure_bf16_training_loses() -> None:
    """The same model and data from the same start, in fp32 and in bf16: their trajectories differ, but
    the share of updates bf16 rounds away is the share the prediction gave, within a few percent."""
    master, _ = _train(_model(), _adam(lr=1e-4))
    pure, _ = _train(_model(torch.bfloat16), _adam(lr=1e-4))
    for name in master.updated_params:
        predicted, lost = master.update_stats(name).stalled_share("bf16"), pure.update_stats(name).lost_share
        assert lost == pytest.approx(predicted, abs=0.05), name


def test_counting_reads_nothing_from_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # The torch path, which a GPU's tensors take (the compiled kernel is for CPU tensors, where a read is free)
    monkeypatch.setattr(mpdiag.record._cpu_updates, "available", lambda weight: False)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 8)).pow(2).mean().backward()
    before = {p: p.detach().clone() for p in model.parameters()}
    opt.step()
    stall = stall_formats(torch.float32, ("fp16", "bf16", "fp8_e4m3"))
    with CountHostReads() as mode:
        moments = dict(second_moments(opt))
        for p in model.parameters():
            count_update(before[p], p.detach().double() - before[p].double(), p.grad, stall, moments[p])
    assert mode.reads == 0 and len(moments) == 4


def _tied_run() -> mpdiag.Run:
    """One Adam step of an embedding whose weight the output layer shares."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    model[1].weight = model[0].weight
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        model(torch.arange(10)).pow(2).mean().backward()
        opt.step()
    return diag.run


def test_a_tied_weight_answers_to_either_name() -> None:
    run = _tied_run()
    assert run.updated_params == ["0.weight"]
    assert run.update_stats("1.weight") == run.update_stats("0.weight")


def test_a_run_file_holds_the_updates_and_an_older_file_reads_as_having_none(tmp_path: Path) -> None:
    run, _ = _train(_model(), _adam(), run_file=tmp_path / "run.mpdiag")
    assert run.updates and mpdiag.load(tmp_path / "run.mpdiag").updates == run.updates
    shutil.copy(tmp_path / "run.mpdiag", tmp_path / "older.mpdiag")
    with sqlite3.connect(tmp_path / "older.mpdiag") as db:
        db.execute("DROP TABLE updates")  # what a file written before updates were stored holds
    db.close()
    older = mpdiag.load(tmp_path / "older.mpdiag")
    assert older.updates == {} and older.records == run.records
    with pytest.raises(UnknownSiteError, match="no update"):
        older.update_stats("0.weight")


def test_updates_off_records_no_update_stats_and_training_is_the_same_bit_for_bit() -> None:
    def final(**options):  # noqa: ANN003, ANN202
        model = _model(torch.bfloat16)
        run, _ = _train(model, _adam(lr=1e-3, amsgrad=True), **options)
        return run, [p.detach().clone() for p in model.parameters()]

    on, with_updates = final()
    off, without = final(updates=False)
    assert on.updates and not off.updates
    assert all(torch.equal(a, b) for a, b in zip(with_updates, without))


def test_a_parameter_another_optimizer_steps_is_not_judged_by_this_one() -> None:
    model = _model(torch.bfloat16)
    first = torch.optim.Adam(model[0].parameters(), lr=1e-4)
    second = torch.optim.SGD(model[2].parameters(), lr=0.5)
    with mpdiag.diagnose(model, optimizer=first) as diag:
        for _ in range(2):
            first.zero_grad(), second.zero_grad()
            model(torch.randn(4, 8, dtype=torch.bfloat16)).float().pow(2).mean().backward()
            first.step(), second.step()  # the second one's step changes 2.weight after this one's closed
    assert diag.run.updated_params == ["0.weight", "0.bias"]
    with pytest.raises(UnknownSiteError, match="does not step it"):
        diag.run.update_stats("2.weight")


def test_sparse_gradients_count_their_non_zero_rows() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 4, sparse=True), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        opt.zero_grad()
        model(torch.tensor([1, 5, 5, 7])).sum().backward()
        assert model[0].weight.grad.is_sparse
        before = model[0].weight.detach().clone()
        opt.step()
    u = diag.run.update_stats("0.weight", 0)
    assert u.grad_nonzero == 3 * 4 and u.nonzero == int((model[0].weight.detach() != before).sum()) > 0


def test_the_eps_share_counts_only_the_steps_that_judged_eps() -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=100.0)  # eps dominates every element it judges
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        for step in range(3):
            opt.zero_grad()
            out = model[0](torch.randn(4, 8)) if step == 0 else model(torch.randn(4, 8))  # 2.* idle in step 0
            out.pow(2).mean().backward()
            opt.step()
    assert diag.run.update_stats("2.weight", 0).eps_dominated is None  # no gradient: Adam skipped it
    merged = diag.run.update_stats("2.weight")
    assert merged.eps_share == 1.0 and merged.eps_numel == 2 * 32 * 4


def test_a_tied_parameters_update_and_state_sites_answer_to_either_name() -> None:
    run = _tied_run()
    assert run.stats("1.weight", "update") == run.stats("0.weight", "update")
    assert run.stats("1.weight.exp_avg_sq", "optimizer_state") == run.stats("0.weight.exp_avg_sq", "optimizer_state")
    without = dataclasses.replace(
        run, records={s: {k: v for k, v in r.items() if k.kind != Kind.UPDATE} for s, r in run.records.items()}
    )
    with pytest.raises(UnknownSiteError, match="none of them has an update site"):
        without.stats("1.weight", "update")


def test_a_group_with_no_learning_rate_loses_nothing_and_radam_has_no_eps_share() -> None:
    model = _model(torch.bfloat16)
    opt = torch.optim.Adam(
        [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters(), "lr": 1e-4}]
    )
    run, _ = _train(model, lambda params: opt)
    assert run.update_stats("0.weight").lost is None and run.update_stats("2.weight").lost > 0
    radam, _ = _train(_model(), lambda params: torch.optim.RAdam(params, lr=1e-3))  # eps on the uncorrected root
    assert all(radam.update_stats(n).eps_dominated is None for n in radam.updated_params)


def test_a_second_moment_not_shaped_as_its_parameter_is_not_judged() -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    weight = model[0].weight
    opt.state[weight]["exp_avg_sq"] = torch.ones(3)  # as a low-rank optimizer (GaLore) keeps it
    judged = {id(p) for p, _ in second_moments(opt)}
    assert id(weight) not in judged and id(model[0].bias) in judged
