"""Run: plain data that answers questions about sites and steps."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import mpdiag
from mpdiag import Kind, Site, TensorStats
from mpdiag.core.errors import MpdiagError, UnknownSiteError
from mpdiag.record._accumulate import tensor_stats


@pytest.fixture(scope="module")
def run() -> mpdiag.Run:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with mpdiag.diagnose(model, every=2) as diag:
        for _ in range(5):
            model(torch.randn(3, 4)).sum().backward()
            diag.step()
    return diag.run


def test_steps_and_sites(run: mpdiag.Run) -> None:
    assert run.steps == [0, 2, 4]
    assert Site("0", Kind.ACTIVATION) in run.sites and ("2.bias", "param") in run.sites
    modules, params = ("", "0", "1", "2"), ("0.weight", "0.bias", "2.weight", "2.bias")
    expected = {Site(n, k) for n in modules for k in (Kind.ACTIVATION, Kind.ACTIVATION_GRAD)} | {
        Site(n, k) for n in params for k in (Kind.PARAM, Kind.PARAM_GRAD)
    }
    assert set(run.sites) == expected and len(run.sites) == len(expected)  # every site, each listed once


def test_stats_without_step_merges_every_recorded_step(run: mpdiag.Run) -> None:
    per_step = [run.stats("0", "activation", step=s) for s in run.steps]
    assert run.stats("0", Kind.ACTIVATION) == TensorStats.merge_all(per_step)
    assert run.stats("0", "activation").numel == 3 * 3 * 8


def test_unknown_sites_name_close_matches(run: mpdiag.Run) -> None:
    with pytest.raises(UnknownSiteError, match="did you mean '2.weight'"):
        run.stats("2.wieght", "param")
    with pytest.raises(UnknownSiteError, match="did you mean '2.weight'"):
        run.stats("2.WEIGHT", "param")
    with pytest.raises(UnknownSiteError, match="'1' was recorded as activation"):
        run.stats("1", "param")
    with pytest.raises(MpdiagError, match="unknown site kind 'weights'"):
        run.stats("0", "weights")


def test_unrecorded_steps_are_errors_listing_the_recorded_ones(run: mpdiag.Run) -> None:
    with pytest.raises(MpdiagError, match="recorded steps: 0, 2, 4"):
        run.stats("0", "activation", step=1)
    with pytest.raises(MpdiagError, match="step 3 was not recorded; recorded steps: 0, 2, 4"):
        run.table(step=3)


def test_table_has_one_flat_row_per_site(run: mpdiag.Run) -> None:
    rows = run.table()
    assert len(rows) == len(run.sites)
    row = next(r for r in rows if (r["name"], r["kind"]) == ("0", "activation"))
    assert row["numel"] == 72 and "fp16_underflow" in row and "fp8_e5m2_overflow" in row
    assert {r["kind"] for r in run.table(step=2)} == {k.value for k in Kind if not k.is_optimizer}  # no optimizer=


def test_run_is_independent_of_the_model() -> None:
    model = nn.Linear(2, 2)
    weight = model.weight.detach().clone()
    with mpdiag.diagnose(model) as diag:
        model(torch.ones(1, 2)).sum().backward()
        diag.step()
        snapshot = diag.run  # taken mid-training: what follows must not reach it
        with torch.no_grad():
            model.weight.mul_(1e6)  # the parameters it measured change in place
        model(torch.ones(1, 2)).sum().backward()
        diag.step()
    assert diag.run.steps == [0, 1] and diag.run.stats("weight", "param", step=1) != tensor_stats(weight)
    assert snapshot.steps == [0] and snapshot.stats("weight", "param") == tensor_stats(weight)
    assert snapshot.stats("", "activation").numel == 2
    gone = weakref.ref(model)
    del model, diag
    gc.collect()
    assert gone() is None  # the Run keeps no reference to the model, its tensors or the diagnosis


def tiny_gpt2() -> nn.Module:
    """GPT-2 from a config, random weights, nothing downloaded; its output layer is its token embedding."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def train_one_step(model: nn.Module, **options: object) -> mpdiag.Diagnosis:
    with mpdiag.diagnose(model, **options) as diag:
        tokens = torch.randint(0, 50, (2, 8))
        model(input_ids=tokens, labels=tokens).loss.backward()
    return diag


def test_a_tied_parameter_answers_to_each_of_its_names(tmp_path: Path) -> None:
    model = tiny_gpt2()
    diag = train_one_step(model, run_file=tmp_path / "gpt2.mpdiag")
    grad = model.lm_head.weight.grad  # one tensor: the sum of the embedding's and the output layer's gradients
    for run in (diag.run, mpdiag.load(tmp_path / "gpt2.mpdiag")):
        assert run.meta["tied_parameters"] == [["transformer.wte.weight", "lm_head.weight"]]
        assert ("transformer.wte.weight", "param") in run.sites and ("lm_head.weight", "param") not in run.sites
        for kind in ("param", "param_grad"):
            assert run.stats("lm_head.weight", kind) == run.stats("transformer.wte.weight", kind)
        asked = run.stats("lm_head.weight", "param_grad", step=0)
        assert (asked.numel, asked.amax) == (grad.numel(), grad.abs().max().item())
        with pytest.raises(UnknownSiteError, match="did you mean 'lm_head.weight'"):
            run.stats("LM_HEAD.weight", "param")


def test_a_tied_parameter_is_recorded_under_whichever_name_was_observed() -> None:
    model = tiny_gpt2()
    run = train_one_step(model, include="lm_head").run
    assert ("lm_head.weight", "param") in run.sites
    assert run.stats("transformer.wte.weight", "param") == run.stats("lm_head.weight", "param")
    run = train_one_step(model, include="transformer.h.*").run
    with pytest.raises(UnknownSiteError, match="'lm_head.weight' is tied to 'transformer.wte.weight'"):
        run.stats("lm_head.weight", "param")
