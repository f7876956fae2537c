"""The README's set-up commands are the ones CI runs and work one after the other; its quick start runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

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


def test_ci_stops_at_the_first_failing_command(tmp_path: Path) -> None:
    """Under set -e a failure before the last && of a list does not stop the script: .ci/run chains only
    the README's command, and checks its status right after."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "set -euo pipefail" in lines
    test_command = _shell_blocks()[1].split("&& ", 2)[-1]
    # "[ test ] && x=y" is a condition, meant to be false at times; any other list would hide a failure
    chained = [line for line in lines if "&&" in line and not line.startswith(("#", "["))]
    assert chained == [test_command]
    after = lines[lines.index(test_command) + 1 :]
    assert next(line for line in after if not line.startswith("#")).startswith("status=$?")
    # the shell behaviour that makes this necessary
    script = tmp_path / "s.sh"
    script.write_text("set -euo pipefail\nfalse && true\necho reached\n")
    assert subprocess.run(["bash", str(script)], capture_output=True, text=True).stdout == "reached\n"


def test_python_examples_run_in_order(tmp_path: Path, monkeypatch) -> None:
    from torch_support import cpu_fp16_autocast

    monkeypatch.chdir(tmp_path)  # the quick start writes its report into the working directory
    blocks = re.findall(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 4
    namespace: dict[str, object] = {}
    for i, code in enumerate(blocks):
        if i == 1 and not cpu_fp16_autocast():
            code = code.replace("batch, [", "batch, dtype=torch.bfloat16, scales=[")
        if i == 3 and not cpu_fp16_autocast():
            code = code.replace("torch.float16", "torch.bfloat16")
        exec(compile(code.replace("print(", "(lambda *a: a)("), "README.md", "exec"), namespace)
    assert namespace["rows"] and namespace["adv"].recommended and namespace["res"].scales == (2.0**8, 2.0**16)
    assert namespace["origin"] is None
    assert namespace["answer"].names == () and namespace["sens"].loss_error < 0.01  # a healthy model
    assert (tmp_path / "mpdiag-report" / "report.html").exists() and namespace["report"].verdicts


_VENV = "python3 -m venv .venv && . .venv/bin/activate"
# Differs from the README in two ways, to keep the test affordable. The virtual environment reuses the
# packages of the one running this test (torch above all): --system-site-packages as .ci/run does, and a
# .pth line naming this environment's site-packages, which the system's may not hold. pip then installs
# mpdiag itself and finds every dependency present. And the test command runs one notebook, not the whole
# suite (which holds this test): its kernel starts outside the checkout, where a broken install shows.
# (The compiled kernel is cached in the test's directory, not the user's: MPDIAG_CACHE_DIR.)
_VENV_REUSING_OURS = (
    "python3 -m venv --system-site-packages .venv && . .venv/bin/activate && "
    "python -c \"import os, site; open(os.path.join(site.getsitepackages()[0], 'runner.pth'), "
    "'w').write(os.environ['RUNNER_SITE'])\""
)
_ONE_NOTEBOOK = "python -m pytest -q tests/test_notebooks.py -k nan_hunt"


@pytest.mark.slow
def test_both_setup_commands_run_in_one_checkout_leave_it_importable_from_anywhere(tmp_path: Path) -> None:
    runner_site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    if any((Path(site) / "mpdiag").is_dir() for site in runner_site):
        pytest.skip("this environment has mpdiag installed as a copy, which would hide the editable install")
    checkout = tmp_path / "checkout"
    shutil.copytree(
        ROOT,
        checkout,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            ".ci-venv",
            "*.egg-info",
            "__pycache__",
            "build",
            "dist",
            ".hypothesis",
            "site",
            "mpdiag-demo",
            "mpdiag-report",
            "*.mpdiag",
        ),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPDIAG_", "VIRTUAL_ENV"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",  # python3: this test's Python
        RUNNER_SITE="\n".join(sorted(runner_site)),
        MPDIAG_CACHE_DIR=str(tmp_path / "mpdiag-cache"),
    )
    install, test = _shell_blocks()
    assert install.startswith(_VENV) and test.startswith(_VENV) and test.endswith("python -m pytest")
    for command in (install, test.replace("python -m pytest", _ONE_NOTEBOOK)):
        done = subprocess.run(
            ["bash", "-c", command.replace(_VENV, _VENV_REUSING_OURS)],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    python = checkout / ".venv" / "bin" / "python"
    found = subprocess.run(
        [python, "-c", "import mpdiag; print(mpdiag.__file__); mpdiag.diagnose"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == checkout / "mpdiag" / "__init__.py"
    # The demo compiled the kernel, and kept it in the cache for the next process.
    assert list((tmp_path / "mpdiag-cache" / "numba").glob("*/_cpu_kernel.*.nbi"))
