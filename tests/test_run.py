"""Run: plain data that answers questions about sites and steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mpdiag
from mpdiag import Kind, Site, TensorStats
from mpdiag.errors import MpdiagError, UnknownSiteError


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
    assert len(run.sites) == len(set(run.sites))


def test_stats_without_step_merges_every_recorded_step(run: mpdiag.Run) -> None:
    per_step = [run.stats("0", "activation", step=s) for s in run.steps]
    assert run.stats("0", Kind.ACTIVATION) == TensorStats.merge_all(per_step)
    assert run.stats("0", "activation").numel == 3 * 3 * 8


def test_unknown_sites_name_close_matches(run: mpdiag.Run) -> None:
    with pytest.raises(UnknownSiteError, match="did you mean '2.weight'"):
        run.stats("2.wieght", "param")
    with pytest.raises(UnknownSiteError, match="'1' was recorded as activation"):
        run.stats("1", "param")
    with pytest.raises(MpdiagError, match="unknown site kind 'weights'"):
        run.stats("0", "weights")


def test_unrecorded_steps_are_errors_listing_the_recorded_ones(run: mpdiag.Run) -> None:
    with pytest.raises(MpdiagError, match="recorded steps: 0, 2, 4"):
        run.stats("0", "activation", step=1)
    with pytest.raises(MpdiagError, match="recorded steps"):
        run.table(step=3)


def test_table_has_one_flat_row_per_site(run: mpdiag.Run) -> None:
    rows = run.table()
    assert len(rows) == len(run.sites)
    row = next(r for r in rows if (r["name"], r["kind"]) == ("0", "activation"))
    assert row["numel"] == 72 and "fp16_underflow" in row and "fp8_e5m2_overflow" in row
    assert {r["kind"] for r in run.table(step=2)} == {k.value for k in Kind}


def test_run_is_independent_of_the_model() -> None:
    model = nn.Linear(2, 2)
    with mpdiag.diagnose(model) as diag:
        model(torch.ones(1, 2)).sum().backward()
    snapshot = diag.run
    del model, diag
    assert snapshot.stats("", "activation").numel == 2
