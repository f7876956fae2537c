"""Alongside torch's anomaly mode: its error reaches the user unchanged, its report is kept."""

from __future__ import annotations

import warnings

import pytest
import torch
from nonfinite_models import InfInBackward, sqrt_model
from torch import nn

import mpdiag

pytestmark = pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")


def test_anomaly_error_is_unchanged_and_recorded_even_with_warnings_ignored() -> None:
    model = sqrt_model()
    x = torch.randn(8, 4)
    with pytest.raises(RuntimeError, match="returned nan values") as plain:  # what anomaly mode says without mpdiag
        with torch.autograd.detect_anomaly(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(x).sum().backward()
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="returned nan values") as seen:
            with mpdiag.diagnose(model) as diag, torch.autograd.detect_anomaly():
                model(x).sum().backward()
    assert type(seen.value) is type(plain.value) and str(seen.value) == str(plain.value)
    assert not shown  # the user's filter still decides what is displayed
    (record,) = diag.run.anomalies
    assert record.message == str(plain.value) and record.node in record.message
    assert record.module == "2"  # the failing node was created by the last Linear's forward
    assert any("F.linear" in frame for frame in record.traceback)
    assert record.step == 0
    # mpdiag's own events name the module that made the NaN in forward, which anomaly mode cannot
    first = diag.run.first_nonfinite()
    assert (first.name, first.phase, first.produced) == ("1", "forward", True)


def test_the_anomaly_error_is_not_replaced_by_on_nonfinite_raise() -> None:
    model = sqrt_model()
    with pytest.raises(RuntimeError, match="returned nan values") as seen:
        with mpdiag.diagnose(model, on_nonfinite="raise") as diag, torch.autograd.detect_anomaly():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model(torch.randn(8, 4)).sum().backward()
    assert not isinstance(seen.value, mpdiag.NonFiniteError)
    assert diag.run.first_nonfinite().name == "1"  # recorded all the same


def test_the_warning_is_still_shown_when_the_user_shows_warnings() -> None:
    model = sqrt_model()
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="returned nan values"):
            with mpdiag.diagnose(model), torch.autograd.detect_anomaly():
                model(torch.randn(8, 4)).sum().backward()
    assert any("Traceback of forward call" in str(w.message) for w in shown)


def test_an_inf_made_only_in_backward_passes_anomaly_mode_and_mpdiag_finds_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), InfInBackward(), nn.Linear(4, 2))
    with mpdiag.diagnose(model) as diag, torch.autograd.detect_anomaly(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # one sample and a positive input: every gradient is +-inf, none becomes inf - inf = NaN
        model(torch.rand(1, 4) + 0.5).sum().backward()  # no error: anomaly mode checks NaN only
        diag.step()
    assert diag.run.anomalies == ()
    first = diag.run.first_nonfinite()
    assert (first.name, first.kind, first.phase) == ("0", "activation_grad", "backward")


def test_after_the_error_the_run_is_consistent_and_every_hook_is_gone() -> None:
    model = sqrt_model()
    showwarning, filters = warnings.showwarning, list(warnings.filters)
    diag = mpdiag.diagnose(model)
    with (
        pytest.raises(RuntimeError, match="returned nan values"),
        torch.autograd.detect_anomaly(),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        model(torch.randn(8, 4)).sum().backward()
    assert "returned nan values" in diag.run.anomalies[0].message  # known without the with-block too
    diag.close()
    run = diag.run
    assert run.steps == [0] and run.stats("1", "activation").nans > 0
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    assert warnings.showwarning is showwarning and warnings.filters == filters
