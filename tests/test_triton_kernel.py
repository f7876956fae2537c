"""The fused Triton kernel that measures GPU tensors, checked without a GPU: Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py where there is no GPU) runs it on CPU tensors, and its counts
must be those of the real casts, bit for bit, as the CPU paths' are. With a GPU the same tests run the
compiled kernel on CUDA tensors. The tensors are kept small: the interpreter runs each block in numpy.

CI installs Triton through the test extra and sets MPDIAG_REQUIRE_TRITON=1, so that a missing Triton
fails these tests there instead of skipping them.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cast_truth import from_bits
from hypothesis import given, settings
from hypothesis import strategies as st
from nonfinite_models import sqrt_model
from stats_reference import (
    FORMATS,
    assert_matches_reference,
    key_edges,
    threshold_neighbours,
    wide_range_with_nonfinite,
)

import mpdiag
from mpdiag.record import _accumulate, _triton_kernel
from mpdiag.record._layout import layout_for

if os.environ.get("MPDIAG_REQUIRE_TRITON") != "1":
    pytest.importorskip("triton", reason="Triton is not installed (it ships with CUDA builds of torch)")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
#: Where the kernel runs: a GPU, or the CPU under the interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check(x: torch.Tensor) -> None:
    """The kernel's statistics of ``x`` (moved to DEVICE) are the reference's, computed from real casts."""
    assert_matches_reference(x.to(DEVICE))


@pytest.fixture(autouse=True)
def _interpreted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every tensor measured here goes through the Triton kernel, interpreted on the CPU; returns the
    sizes of the tensors it counted, so that a test can check the kernel really ran."""
    if DEVICE.type == "cpu" and not _triton_kernel.interpreted():
        pytest.skip("no GPU, and TRITON_INTERPRET=1 was not set before Triton was imported (see conftest.py)")
    monkeypatch.setattr(_accumulate, "use_cpu_kernel", lambda: False)
    monkeypatch.setattr(_accumulate, "use_triton_kernel", lambda x: True)
    counted: list[int] = []
    real = _triton_kernel.count

    def count(x: torch.Tensor, *args: object) -> torch.Tensor:
        counted.append(x.numel())
        return real(x, *args)

    monkeypatch.setattr(_triton_kernel, "count", count)
    return counted


def test_the_kernel_runs(_interpreted: list[int]) -> None:
    check(torch.tensor([0.0, 1e-9, 3.0, 7e4]))
    assert _interpreted == [4]
    assert _triton_kernel._source.INTERPRETED == (DEVICE.type == "cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_16_bit_value(dtype: torch.dtype) -> None:
    check(torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_key_edge(dtype: torch.dtype) -> None:
    """Where a key-based count could slip: each key's first value and its neighbours."""
    check(key_edges(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thresholds_and_their_neighbours(dtype: torch.dtype) -> None:
    check(threshold_neighbours(dtype))


@settings(max_examples=25)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=3000))
def test_any_fp32_bit_patterns(bits: list[int]) -> None:
    check(from_bits(bits, torch.float32))


@settings(max_examples=25)
@given(st.lists(st.floats(width=64), min_size=1, max_size=300))
def test_any_fp64_values(values: list[float]) -> None:
    check(torch.tensor(values, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_many_blocks_over_a_wide_range(dtype: torch.dtype) -> None:
    """More blocks than programs (each program loops), with NaN, inf and zeros scattered among them."""
    check(wide_range_with_nonfinite(1 << 15).to(dtype))


def test_layouts_fp8_and_the_one_element_tensor() -> None:
    x = torch.randn(64, 33) * torch.logspace(-30, 10, 33)
    check(x.t())  # non-contiguous
    check(x[:, ::3])
    check(x.to(torch.float8_e5m2))  # widened to the source dtype first
    check(torch.tensor(-0.0))
    check(torch.tensor([math.nan, -math.nan]))


def test_equal_to_the_torch_ops_path(monkeypatch: pytest.MonkeyPatch) -> None:
    x = (torch.randn(5000) * 1e-4).to(DEVICE)
    fused = mpdiag.tensor_stats(x, FORMATS)
    monkeypatch.setattr(_accumulate, "use_triton_kernel", lambda x: False)
    assert mpdiag.tensor_stats(x, FORMATS) == fused


def test_the_buffer_holds_counts_then_statistics() -> None:
    """One int64 buffer per tensor: the accumulators and the event log read it as two views."""
    x = torch.tensor([1.0, -3.0, math.inf, 2.0**-20], device=DEVICE)
    layout = layout_for(x.dtype, ("fp16",))
    buffer = _triton_kernel.count(x, layout, *_accumulate._TRITON_SLOTS, len(_accumulate.DEVICE_STATS.names))
    assert buffer.dtype == torch.int64 and buffer.numel() == layout.n_buckets + 2
    assert int(buffer[: layout.n_buckets].sum()) == 4
    assert _accumulate.DEVICE_STATS.unpack(buffer[layout.n_buckets :].view(torch.float64).cpu().numpy()) == {
        "amax": 3.0,
        "amin_nonzero": 2.0**-20,
    }


class Twice(torch.nn.Module):
    """Runs its model twice a forward: every site inside sees two tensors a step."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = sqrt_model()  # NaN in forward at "inner.1", and so in backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.inner(x.flip(0))


def run_of(monkeypatch: pytest.MonkeyPatch, fused: bool) -> mpdiag.Run:
    monkeypatch.setattr(_accumulate, "use_triton_kernel", lambda x: fused)
    torch.manual_seed(0)
    model = Twice().to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(8, 4, device=DEVICE)).sum().backward()
            opt.step()
    return diag.run


def test_a_diagnosed_training_records_what_the_torch_ops_path_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the hooks: accumulation of several observations per site (a borrowed buffer copied before
    it is added to), the event log reading each observation's own counts at the step close."""
    fused, ops = run_of(monkeypatch, True), run_of(monkeypatch, False)
    assert fused.sites == ops.sites and fused.steps == ops.steps
    for step in ops.steps:
        for site in ops.sites:
            assert fused.stats(site.name, site.kind, step) == ops.stats(site.name, site.kind, step), (step, site)
    assert ops.stats("inner.0", "activation", ops.steps[0]).calls == 2
    assert fused.events == ops.events and any(e.nans for events in ops.events.values() for e in events)


def test_the_kernel_compiles_for_the_gpus_it_targets() -> None:
    """Triton compiles it for H100- and A100-class GPUs, here, without either: a kernel the interpreter
    runs can still be one the compiler rejects (types that differ between branches, say). In a process of
    its own, since the interpreter patches Triton's language module once it has run."""
    script = Path(__file__).with_name("compile_triton_kernel.py")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = done.stdout.split()
    assert sorted(compiled) == sorted(f"{dtype}@sm{cc}" for dtype in DTYPES for cc in (90, 80)), done.stdout
