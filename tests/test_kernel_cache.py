"""The compiled kernel is cached in a per-user directory, never in the installed package: real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mpdiag

pytest.importorskip("numba")

PACKAGE = Path(mpdiag.__file__).resolve().parent
KERNELS = ("_bucket", "_extremes", "_key_histogram", "_count", "_count_parallel")

# Measures a small and a large tensor (the kernel's direct and threaded paths), then reports, per compiled
# function, where it caches and how often it compiled (misses) or loaded (hits). A function of the user's
# own, with numba's cache=True, shows where numba caches everything that is not mpdiag's.
SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from mpdiag.record import _cpu_kernel
    from mpdiag import tensor_stats

    assert _cpu_kernel.available()
    tensor_stats(torch.randn(1000))
    tensor_stats(torch.randn(100_000))
    _cpu_kernel.finish_compiling()  # the threaded kernel compiles in the background
    sys.path.insert(0, sys.argv[1])
    import user_code
    user_code.double(2.0)
    report = {name: getattr(_cpu_kernel, name).stats for name in sys.argv[2:]}
    report["user_code"] = user_code.double.stats
    print(json.dumps({name: [s.cache_path, s.cache_misses.total(), s.cache_hits.total()]
                      for name, s in report.items()}))
""")


def package_files() -> dict[Path, int]:
    """Every file of the package but its sources (which a developer may be editing) and when it changed."""
    return {p: p.stat().st_mtime_ns for p in PACKAGE.rglob("*") if p.is_file() and p.suffix != ".py"}


def run_kernels(tmp_path: Path, **env: str) -> dict[str, list]:
    user_dir = tmp_path / "user"
    user_dir.mkdir(exist_ok=True)
    (user_dir / "user_code.py").write_text(
        "import numba\n\n@numba.njit(cache=True)\ndef double(x):\n    return 2 * x\n"
    )
    # Without bytecode writes, any file that appears in the package is one the kernel wrote; two threads
    # or more take the threaded path on any machine.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "MPDIAG_NUMBA": "1", "NUMBA_NUM_THREADS": "2", **env}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(user_dir), *KERNELS],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_the_kernel_caches_outside_the_package_and_the_next_process_loads_it(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    before = package_files()
    first = run_kernels(tmp_path, MPDIAG_CACHE_DIR=str(cache))
    assert package_files() == before
    expected = cache / "numba" / mpdiag.__version__
    assert {name: (path, misses) for name, (path, misses, _) in first.items() if name != "user_code"} == {
        name: (str(expected), 1) for name in KERNELS
    }
    assert list(expected.glob("_cpu_kernel.*.nbi")) and list(expected.glob("_cpu_kernel.*.nbc"))
    # The user's own numba code still caches where numba puts it: beside its source.
    assert first["user_code"][0] == str(tmp_path / "user" / "__pycache__")

    # Nothing compiles again: the functions called from Python load, the ones they call come with them.
    second = run_kernels(tmp_path, MPDIAG_CACHE_DIR=str(cache))
    assert [misses for _, misses, _ in second.values()] == [0] * len(second)
    assert [second[name][2] for name in ("_count", "_count_parallel", "user_code")] == [1, 1, 1]
    assert package_files() == before


@pytest.mark.parametrize("setting", ["unusable-directory", "numba-locator-override"])
def test_the_package_stays_untouched_whatever_the_settings(tmp_path: Path, setting: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = (
        {"MPDIAG_CACHE_DIR": str(blocker / "cache")}
        if setting == "unusable-directory"
        else {"MPDIAG_CACHE_DIR": str(tmp_path / "cache"), "NUMBA_CACHE_LOCATOR_CLASSES": "InTreeCacheLocator"}
    )
    before = package_files()
    report = run_kernels(tmp_path, **env)
    assert package_files() == before
    paths = {report[name][0] for name in KERNELS}
    # A directory that cannot be made means compiling in every process (no cache), not an error; numba's
    # locator setting is for the user's code, and mpdiag's kernels keep their own directory.
    assert paths == (
        {None} if setting == "unusable-directory" else {str(tmp_path / "cache" / "numba" / mpdiag.__version__)}
    )


def test_the_default_directory_is_the_users_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mpdiag.record._kernel_cache import cache_dir

    monkeypatch.delenv("MPDIAG_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if sys.platform.startswith("linux"):
        assert cache_dir() == tmp_path / "mpdiag" / "numba" / mpdiag.__version__
    assert not cache_dir().is_relative_to(PACKAGE)


def test_the_background_compile_never_runs_a_parallel_region_beside_the_main_thread(tmp_path: Path) -> None:
    # numba's workqueue threading layer (the one pip users on macOS get) aborts the process when two
    # threads run parallel regions at once: the main thread counts with the threaded fp32 kernel while
    # the bf16 one compiles.
    script = textwrap.dedent("""
        import torch, mpdiag
        from mpdiag.record import _cpu_kernel
        x = torch.randn(300_000)
        mpdiag.tensor_stats(x)
        _cpu_kernel.finish_compiling()
        mpdiag.tensor_stats(x.bfloat16())  # asks for the 16-bit threaded kernel: compiling from here on
        while not any(d.itemsize == 2 for d in _cpu_kernel._THREADED_READY):  # threaded regions meanwhile
            mpdiag.tensor_stats(x)
        _cpu_kernel.finish_compiling()
        print(sorted(str(d) for d in _cpu_kernel._THREADED_READY))
    """)
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue", "NUMBA_NUM_THREADS": "2", "MPDIAG_NUMBA": "1",
           "MPDIAG_CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "['int16', 'int32']"
