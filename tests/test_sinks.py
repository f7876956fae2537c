"""Sinks: every recorded step goes to each of a recording's sinks as it closes (the run file is one)."""

from __future__ import annotations

import pytest
import torch

import mpdiag


class _ListSink:
    """A sink that keeps what it is given, to check the order of calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def open(self, formats, meta):
        self.calls.append(("open", formats))

    def write_step(self, step, stats, events, loss_scale, meta):
        self.calls.append(("step", step))

    def write_anomaly(self, record):
        self.calls.append(("anomaly", record.node))

    def close(self):
        self.calls.append(("close", None))

    def discard(self):
        self.calls.append(("discard", None))


def test_a_sink_gets_every_closed_step_between_open_and_close(tmp_path):
    model = torch.nn.Linear(4, 2)
    sink = _ListSink()
    with mpdiag.diagnose(model, formats="fp16", sinks=[sink], run_file=tmp_path / "run.mpdiag") as diag:
        for _ in range(2):
            model(torch.randn(3, 4)).sum().backward()
            diag.step()
    assert sink.calls == [("open", ("fp16",)), ("step", 0), ("step", 1), ("close", None)]
    assert mpdiag.load(tmp_path / "run.mpdiag").steps == [0, 1]  # the run file is a sink beside it


def test_a_failed_attach_discards_what_the_sinks_opened(tmp_path):
    sink = _ListSink()
    model = torch.nn.Linear(4, 2)
    with pytest.raises(mpdiag.MpdiagError, match="scaler must be a torch GradScaler"):
        mpdiag.diagnose(model, sinks=[sink], scaler=object())  # refused before anything opens
    assert sink.calls == []
    holder = torch.nn.Module()
    holder.inner = model
    with mpdiag.diagnose(model), pytest.raises(mpdiag.MpdiagError, match="already being diagnosed"):
        mpdiag.diagnose(holder, sinks=[sink], run_file=tmp_path / "refused.mpdiag")
    assert sink.calls == [] and not (tmp_path / "refused.mpdiag").exists()


def test_a_sink_that_fails_to_close_leaves_no_hook_and_the_others_are_closed():
    class DiskFull(_ListSink):
        def close(self):
            raise OSError(28, "No space left on device")

    model, kept = torch.nn.Linear(4, 2), _ListSink()
    diag = mpdiag.diagnose(model, sinks=[DiskFull(), kept])
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(OSError, match="No space left"):
        diag.close()
    assert kept.calls[-1] == ("close", None) and diag.run.steps == [0]
    assert not model._forward_hooks and not model._forward_pre_hooks
    with mpdiag.diagnose(model):  # the model is free again
        pass
