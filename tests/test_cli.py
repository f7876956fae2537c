"""The mpdiag command, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mpdiag import cli
from mpdiag.core import formats


def mpdiag_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mpdiag", *args], capture_output=True, text=True, timeout=120)


def test_formats_prints_every_format_with_its_constants() -> None:
    result = mpdiag_cli("formats")
    assert result.returncode == 0, result.stderr
    for f in formats.all_formats():
        assert f.name in result.stdout
    assert "65504" in result.stdout and "65520" in result.stdout and "448" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 100


def test_help_and_bad_usage() -> None:
    assert mpdiag_cli("--help").returncode == 0
    assert mpdiag_cli("formats", "--help").returncode == 0
    bad = mpdiag_cli("no-such-command")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.mark.parametrize("command", [[], ["formats"], ["demo"], ["summary"], ["report"]], ids=" ".join)
def test_help_prints_percent_signs_once(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # argparse %-formats help= strings but prints a description as written: one escape each, not both.
    # In this process (what argparse prints is what the command prints; torch makes each start slow).
    with pytest.raises(SystemExit) as exited:  # --help exits: no message, its exit code is checked below
        cli.main([*command, "--help"])
    text = capsys.readouterr().out
    assert exited.value.code == 0 and "%%" not in text
    if command == ["summary"]:
        assert "underflow %, overflow" in " ".join(text.split())


def test_demo_trains_writes_a_run_file_and_the_report_and_prints_the_summary(tmp_path) -> None:
    result = mpdiag_cli("demo", "--steps", "3", "--out", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    path = tmp_path / "demo" / "run.mpdiag"
    assert f"run file: {path}" in result.stdout and "fp16" in result.stdout and "head" in result.stdout
    assert f"report:   {tmp_path / 'demo' / 'report.html'}" in result.stdout
    assert (tmp_path / "demo" / "ranges.png").stat().st_size > 10_000
    assert "step 3/3" in result.stderr  # the progress bar
    import mpdiag

    run = mpdiag.load(path)
    assert run.steps == [0, 1, 2] and run.meta["environment"]["autocast_dtype"] is None
    assert max(len(line) for line in result.stdout.splitlines() if not line.startswith(("run file:", "report:"))) <= 80


def test_unstable_demo_shows_overflow_and_underflow(tmp_path) -> None:
    result = mpdiag_cli("demo", "--steps", "2", "--unstable", "--dtype", "bf16", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    import mpdiag

    run = mpdiag.load(tmp_path / "run.mpdiag")
    assert run.stats("tok", "activation").overflow("fp16") > 0
    assert run.stats("head.weight", "param_grad").underflow("fp16") > 0
    assert run.meta["environment"]["autocast_dtype"] == "bfloat16"
    # which layer to keep in fp32 for fp16: the scaled projection, found by running it
    assert "first non-finite output under autocast: blocks.1.mlp.2" in result.stdout
    assert "keep in fp32 for fp16: blocks.1.mlp.2" in result.stdout
    page = (tmp_path / "report.html").read_text()
    assert 'id="precision"' in page and (tmp_path / "sensitivity.png").exists()
    summary = mpdiag_cli("summary", str(tmp_path / "run.mpdiag"), "--top", "2")
    assert summary.returncode == 0 and summary.stdout.count("\n") < result.stdout.count("\n")
    assert "FAIL  fp16: " in summary.stdout and "OK    bf16: " in summary.stdout  # the verdicts lead
    assert max(len(line) for line in summary.stdout.splitlines()) <= 80


def test_errors_are_one_line_with_exit_code_1_and_a_traceback_only_with_debug(tmp_path) -> None:
    bad = tmp_path / "bad.mpdiag"
    bad.write_text("not a run file")
    result = mpdiag_cli("summary", str(bad))
    assert result.returncode == 1 and result.stderr.startswith("mpdiag: error:")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    debug = mpdiag_cli("--debug", "summary", str(bad))
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert mpdiag_cli("summary").returncode == 2
    assert mpdiag_cli("demo", "--steps", "0").returncode == 2
    assert mpdiag_cli("demo", "--help").returncode == 0 and mpdiag_cli("summary", "--help").returncode == 0


def test_report_writes_the_page_and_figures_of_a_run_file_and_prints_the_verdicts(tmp_path) -> None:
    import torch

    import mpdiag

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with mpdiag.diagnose(model, run_file=tmp_path / "run.mpdiag"):
        (model(torch.randn(2, 4) * 1e6).sum()).backward()
    result = mpdiag_cli("report", str(tmp_path / "run.mpdiag"), "-o", str(tmp_path / "out"), "--top", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("FAIL  fp16: ") and "overflow" in lines[0]
    assert any(line.startswith("OK    bf16: ") for line in lines)
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "<title>mpdiag report: run.mpdiag</title>" in html
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(
        [
            "ranges.png",
            "exponents_activations.png",
            "exponents_parameters.png",
            "over_time.png",
            "loss_scale.png",
            "grad_scaler.png",
        ]
    )
    missing = mpdiag_cli("report", str(tmp_path / "nope.mpdiag"), "-o", str(tmp_path / "x"))
    assert missing.returncode == 1 and missing.stderr.startswith("mpdiag: error:")
    default = mpdiag_cli("report", str(tmp_path / "run.mpdiag"))  # without -o: beside the run file
    assert default.returncode == 0 and (tmp_path / "run-report" / "report.html").exists()
