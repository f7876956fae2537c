"""The README's set-up commands are the ones CI runs, and its quick start runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_exactly_two_setup_commands() -> None:
    blocks = _shell_blocks()
    assert len(blocks) == 2 and all("\n" not in b for b in blocks)
    assert blocks[0].endswith("mpdiag demo") and blocks[1].endswith("python -m pytest")


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_command = _shell_blocks()[1].split("&& ", 2)[-1]  # after creating and activating the venv
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_python_examples_run_in_order(tmp_path: Path, monkeypatch) -> None:
    from test_replay import _cpu_fp16_autocast

    monkeypatch.chdir(tmp_path)  # the quick start writes its report into the working directory
    blocks = re.findall(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 3
    namespace: dict[str, object] = {}
    for i, code in enumerate(blocks):
        if i == 1 and not _cpu_fp16_autocast():
            code = code.replace("batch, [", "batch, dtype=torch.bfloat16, scales=[")
        exec(compile(code.replace("print(", "(lambda *a: a)("), "README.md", "exec"), namespace)
    assert namespace["rows"] and namespace["adv"].recommended and namespace["res"].at(2.0**16)
    assert namespace["origin"] is None
    assert (tmp_path / "mpdiag-report" / "report.html").exists() and namespace["report"].verdicts
