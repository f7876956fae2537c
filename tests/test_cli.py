"""The mpdiag command, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys

from mpdiag import formats


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
