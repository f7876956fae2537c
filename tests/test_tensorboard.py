"""TensorBoard logs, live and after the fact, read back with TensorBoard's own reader and compared with
the Run: values, steps, tags; the step close reads nothing more from the device for them."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from host_reads import CountHostReads
from hypothesis import given, settings
from hypothesis import strategies as st
from models import backward_and_step
from nonfinite_models import sqrt_model
from tensorboard_logs import read_logs
from torch import nn

import mpdiag
import mpdiag.integrations.tensorboard
import mpdiag.record.recording
from mpdiag.core.stats import HIST_EXPONENTS
from mpdiag.integrations.tensorboard import ROOT_TAG


def expected_scalars(run: mpdiag.Run) -> dict[str, dict[int, float]]:
    """What the documented tags must hold, computed here from the Run's statistics."""
    out: dict[str, dict[int, float]] = {}
    for step in run.steps:
        for site, s in run.records[step].items():
            where = f"{site.kind.value}/{site.name or ROOT_TAG}"
            values = {f"nonfinite/{where}/nan": s.nans, f"nonfinite/{where}/inf": s.posinf + s.neginf}
            if s.finite_nonzero:
                values[f"range/{where}/log2_amax"] = math.log2(s.amax)
                values[f"range/{where}/log2_amin_nonzero"] = math.log2(s.amin_nonzero)
                for fmt in run.formats:
                    values[f"{fmt}/{where}/underflow"] = s.underflow(fmt) / s.finite_nonzero
                    values[f"{fmt}/{where}/subnormal"] = s.subnormal(fmt) / s.finite_nonzero
                    values[f"{fmt}/{where}/overflow"] = s.overflow(fmt) / s.finite
            for tag, value in values.items():
                out.setdefault(tag, {})[step] = value
        for name, u in run.updates.get(step, {}).items():
            values = {f"{fmt}/update/{name}/stalled": n / u.nonzero for fmt, n in u.stalled.items()}
            values[f"optimizer/update/{name}/changed"] = u.nonzero / u.numel
            values[f"optimizer/update/{name}/lost"] = u.lost / u.grad_nonzero  # SGD: no eps share
            for tag, value in values.items():
                out.setdefault(tag, {})[step] = value
        if step in run.loss_scales:
            out.setdefault("loss_scale", {})[step] = run.loss_scales[step]
    return out


def assert_scalars_match(logs: dict[str, dict], run: mpdiag.Run) -> None:
    expected = expected_scalars(run)
    assert set(logs["scalars"]) == set(expected)
    for tag, per_step in expected.items():
        # TensorBoard stores scalars as float32
        assert logs["scalars"][tag] == pytest.approx(per_step, rel=1e-6, abs=1e-30), tag


def assert_histograms_match(logs: dict[str, dict], run: mpdiag.Run) -> None:
    for step in run.steps:
        for site, s in run.records[step].items():
            tag = f"log2_magnitude/{site.kind.value}/{site.name or ROOT_TAG}"
            if not s.finite_nonzero:
                assert step not in logs["histograms"].get(tag, {})
                continue
            h = logs["histograms"][tag][step]
            nonzero = np.flatnonzero(s.hist)
            lo, hi = nonzero[0], nonzero[-1]
            assert list(h.bucket) == s.hist[lo : hi + 1].tolist()
            assert list(h.bucket_limit) == (HIST_EXPONENTS[lo : hi + 1] + 1).tolist()  # right edges
            assert (h.min, h.max, h.num) == pytest.approx(
                (math.log2(s.amin_nonzero), math.log2(s.amax), s.finite_nonzero)
            )
        for name, u in run.updates.get(step, {}).items():
            h = logs["histograms"][f"log2_update_ratio/{name}"][step]
            counts = np.asarray(u.ratio_counts)
            nonzero = np.flatnonzero(counts)
            lo, hi = nonzero[0], nonzero[-1]
            assert list(h.bucket) == counts[lo : hi + 1].tolist()
            assert list(h.bucket_limit) == (np.asarray(u.ratio_edges()[lo + 1 : hi + 2])).tolist()
            assert h.num == sum(u.ratio_counts) == u.nonzero - u.from_zero


def train(model: nn.Module, steps: int, scaler: torch.amp.GradScaler | None = None, **options) -> mpdiag.Run:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mpdiag.diagnose(model, optimizer=opt, scaler=scaler, **options) as diag:
        for i in range(steps):
            opt.zero_grad()
            backward_and_step(model(torch.randn(8, 4) * (i + 1)).pow(2).mean(), opt, scaler)
    return diag.run


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 2))


def test_the_live_sink_writes_every_recorded_step_as_the_run_holds_it(tmp_path: Path) -> None:
    run = train(mlp(), 5, every=2, sinks=[mpdiag.sinks.TensorBoard(tmp_path / "tb")])
    assert run.steps == [0, 2, 4]
    logs = read_logs(tmp_path / "tb")
    assert {s for per_step in logs["scalars"].values() for s in per_step} == {0, 2, 4}
    assert_scalars_match(logs, run)
    assert_histograms_match(logs, run)
    assert "fp8_e4m3" in logs["texts"]["environment/text_summary"][0]


def test_tags_group_by_format_then_kind_then_site(tmp_path: Path) -> None:
    train(mlp(), 1, formats=("fp16", "bf16"), sinks=[mpdiag.sinks.TensorBoard(tmp_path)])
    groups = {tag.split("/")[0] for tag in read_logs(tmp_path)["scalars"]}
    assert groups == {"fp16", "bf16", "range", "nonfinite", "optimizer"}
    assert "bf16/update/0.weight/stalled" in read_logs(tmp_path)["scalars"]  # an fp32 weight's updates
    assert "fp16/activation_grad/0/underflow" in read_logs(tmp_path)["scalars"]
    assert f"range/activation/{ROOT_TAG}/log2_amax" in read_logs(tmp_path)["scalars"]  # the root module's output


def test_a_whole_run_file_written_after_the_fact_equals_the_live_logs(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    run = train(
        mlp(), 4, scaler=scaler, run_file=tmp_path / "run.mpdiag", sinks=[mpdiag.sinks.TensorBoard(tmp_path / "live")]
    )
    assert set(run.loss_scales) == {0, 1, 2, 3}
    mpdiag.to_tensorboard(mpdiag.load(tmp_path / "run.mpdiag"), tmp_path / "after")
    live, after = read_logs(tmp_path / "live"), read_logs(tmp_path / "after")
    assert live["scalars"] == after["scalars"] and live["scalars"]["loss_scale"] == run.loss_scales
    assert live["histograms"].keys() == after["histograms"].keys()
    assert_scalars_match(after, run)
    assert_histograms_match(after, run)


def test_the_command_line_writes_a_run_file_to_tensorboard(tmp_path: Path) -> None:
    run = train(mlp(), 2, run_file=tmp_path / "run.mpdiag")
    done = subprocess.run(
        [sys.executable, "-m", "mpdiag", "tensorboard", str(tmp_path / "run.mpdiag"), str(tmp_path / "tb")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote 2 recorded steps" in done.stdout and "tensorboard --logdir" in done.stdout
    assert_scalars_match(read_logs(tmp_path / "tb"), run)


@settings(max_examples=200)
@given(st.binary(max_size=4096))
def test_the_compiled_checksum_is_tensorboards_own(data: bytes) -> None:
    pytest.importorskip("google_crc32c")
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as pure_python
    from tensorboard.summary.writer import record_writer

    mpdiag.integrations.tensorboard._use_compiled_checksum()
    assert record_writer.masked_crc32c._compiled and record_writer.masked_crc32c(data) == pure_python(data)


def test_writing_a_run_twice_into_one_directory_is_refused(tmp_path: Path) -> None:
    run = train(mlp(), 1)
    mpdiag.to_tensorboard(run, tmp_path)
    with pytest.raises(mpdiag.MpdiagError, match="already holds TensorBoard event files"):
        mpdiag.to_tensorboard(run, tmp_path)


def test_nonfinite_events_are_written_as_text_at_their_step(tmp_path: Path) -> None:
    model = sqrt_model()
    with mpdiag.diagnose(model, sinks=[mpdiag.sinks.TensorBoard(tmp_path)]) as diag:
        model(torch.randn(8, 4)).sum().backward()
    logs = read_logs(tmp_path)
    text = logs["texts"]["nonfinite/text_summary"][0]
    assert str(diag.run.first_nonfinite()) in text
    assert logs["scalars"]["nonfinite/activation/1/nan"][0] == diag.run.stats("1", "activation").nans > 0


def test_writing_the_logs_reads_nothing_more_from_the_device(tmp_path: Path) -> None:
    def reads_at_close(sinks: list) -> int:
        torch.manual_seed(0)
        model = mlp()
        with mpdiag.diagnose(model, sinks=sinks) as diag:
            model(torch.randn(8, 4)).sum().backward()
            with CountHostReads() as mode:
                diag.step()
        return mode.reads

    assert reads_at_close([mpdiag.sinks.TensorBoard(tmp_path)]) == reads_at_close([])


def test_a_failed_attach_leaves_no_log_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    with mpdiag.diagnose(model):
        with pytest.raises(mpdiag.MpdiagError, match="already being diagnosed"):
            mpdiag.diagnose(model, sinks=[mpdiag.sinks.TensorBoard(tmp_path / "tb")])
    assert not (tmp_path / "tb").exists()

    def fail(*args: object) -> None:
        raise RuntimeError("a hook could not be installed")

    monkeypatch.setattr(mpdiag.record.recording.Recording, "_install", fail)
    with pytest.raises(RuntimeError, match="could not be installed"):
        mpdiag.diagnose(model, sinks=[mpdiag.sinks.TensorBoard(tmp_path / "tb")])  # fails after the sink opened
    assert not (tmp_path / "tb").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("the user's")
    sink = mpdiag.sinks.TensorBoard(tmp_path / "kept")
    sink.open(("fp16",), {})
    sink.discard()
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["mine.txt"]


def test_without_tensorboard_installed_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"mpdiag\[tensorboard\]"):
        mpdiag.to_tensorboard(train(mlp(), 1), "unused")
