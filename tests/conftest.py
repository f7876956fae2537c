"""Shared test set-up: hypothesis profiles sized for a 2-core CI machine."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU, Triton's interpreter runs mpdiag's GPU kernel on CPU tensors (tests/test_triton_kernel.py).
# Triton reads this setting when it is imported (its own library functions are decorated then), so it is
# set here, before any test imports it; with a GPU the kernel runs for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=["torch-ops", "cpu-kernel"])
def stats_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on both ways of measuring CPU tensors: torch ops (as on GPUs) and the numba kernel."""
    from mpdiag.record import _accumulate, _cpu_kernel

    if request.param == "cpu-kernel" and not _cpu_kernel.available():
        pytest.skip("numba is not installed")
    monkeypatch.setattr(_accumulate, "use_cpu_kernel", lambda: request.param == "cpu-kernel")
    return request.param


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps its state (mixed precision among it) in process-wide singletons that refuse a
    change once set: each test, and each documentation page, starts without it, as a new process would."""
    _reset_accelerate()
    yield
    _reset_accelerate()


def _reset_accelerate() -> None:
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)
        state.GradientState._reset_state()
