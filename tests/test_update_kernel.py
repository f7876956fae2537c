"""The compiled CPU kernel of the update counts gives the torch path's counts (which use torch's casts),
on the values where rounding is decided: half-ulps of every format, ties, powers of two, subnormals,
the overflow thresholds, zeros, NaN and inf."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpdiag.core import formats
from mpdiag.record import _cpu_updates, _updates
from mpdiag.record._updates import count_update, decode

pytestmark = pytest.mark.skipif(not _cpu_updates.usable(torch.ones(1)), reason="numba is not installed")

FORMATS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")


def both_paths(before, update, grad, moment, monkeypatch):  # noqa: ANN001, ANN201
    """The decoded counts of the kernel and of the torch path, for weights ``before`` (any dtype)."""
    _cpu_updates.finish_compiling()
    # every narrower format, fp8 too: the counting takes any format (stall_formats asks for 16-bit ones)
    stall = tuple(f for f in map(formats.get, FORMATS) if f.bits < torch.finfo(before.dtype).bits)
    name = str(before.dtype).replace("torch.", "")
    assert _cpu_updates.available(before)
    kernel = decode("w", name, stall, count_update(before, update, grad, stall, moment).numpy())
    with monkeypatch.context() as patch:
        patch.setattr(_cpu_updates, "available", lambda weight: False)
        torch_path = decode("w", name, stall, count_update(before, update, grad, stall, moment).numpy())
    return kernel, torch_path


def deciding_values() -> list[float]:
    """Weights where rounding to some format is decided: each format's thresholds, powers of two around
    its range and the values either side of them, with zeros and the non-finite."""
    values = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, 3e38]
    for name in FORMATS:
        f = formats.get(name)
        for edge in (f.max, f.overflow_threshold, f.min_normal, f.min_subnormal, f.min_subnormal / 2, 1.0, 2.0 - f.eps):
            for scale in (1.0, 1 + f.eps / 2, 1 - f.eps / 4, 1 + 2**-23, 1 - 2**-24):
                values += [edge * scale, -edge * scale]
    with np.errstate(over="ignore"):  # the values just past fp32's max become inf: they are wanted too
        return [float(np.float32(v)) for v in values]


def updates_around(weight: float) -> list[float]:
    """Updates at and either side of the half-ulp and quarter-ulp of ``weight`` in every format."""
    out = [0.0, 1e-30, -1e-30]
    for name in FORMATS:
        f = formats.get(name)
        if not math.isfinite(weight) or weight == 0:
            ulp = f.min_subnormal
        else:
            ulp = math.ldexp(
                1.0, max(math.frexp(abs(weight))[1] - 1, math.frexp(f.min_normal)[1] - 1) - f.mantissa_bits
            )
        for k in (0.25, 0.5, 1.0):
            for nudge in (1.0, 1 + 2**-20, 1 - 2**-20):
                out += [ulp * k * nudge, -ulp * k * nudge]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_the_kernel_counts_what_the_torch_path_counts_where_rounding_is_decided(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = [(w, d) for w in deciding_values() for d in updates_around(w)]
    before = torch.tensor([w for w, _ in pairs], dtype=torch.float32).to(dtype)
    after = (before.float() + torch.tensor([d for _, d in pairs])).to(dtype)
    update = after.double() - before.double()
    update = torch.where(update.isnan() & before.isnan(), 0.0, update)  # NaN weights with a 0 update too
    grad = torch.tensor([float(i % 3) for i in range(len(pairs))])
    moment = (torch.rand(len(pairs)), 0.5)
    kernel, torch_path = both_paths(before, update, grad, moment, monkeypatch)
    assert kernel == torch_path
    assert 0 < kernel.stalled[next(iter(kernel.stalled))] < kernel.nonzero  # the data decides both ways


@settings(max_examples=150, deadline=None)
@given(
    weights=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=64),
    ratios=st.lists(st.floats(min_value=-1.0, max_value=1.0), min_size=64, max_size=64),
    scale=st.integers(min_value=-16, max_value=2),
)
def test_the_kernel_counts_what_the_torch_path_counts_on_random_steps(weights, ratios, scale) -> None:  # noqa: ANN001
    before = torch.tensor(weights, dtype=torch.float32)
    update = (before.double() * torch.tensor(ratios[: len(weights)], dtype=torch.float64) * 2.0**scale).float()
    after = before + update  # a real fp32 step
    exact = after.double() - before.double()
    with pytest.MonkeyPatch.context() as patch:
        kernel, torch_path = both_paths(before, exact, None, None, patch)
    assert kernel == torch_path


def test_large_parameters_are_counted_in_threads_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    n = _cpu_updates._PARALLEL_FROM + 12345  # threaded, a last chunk of uneven size
    g = torch.Generator().manual_seed(0)
    before = torch.randn(n, generator=g) * 0.05
    update = (torch.randn(n, generator=g) * 1e-4).double()
    moment = (torch.rand(n, generator=g) * 1e-6, torch.tensor(2.5e-7, dtype=torch.float64))
    kernel, torch_path = both_paths(before, update, torch.randn(n, generator=g), moment, monkeypatch)
    assert kernel == torch_path and kernel.numel == n
    assert _updates.CHUNK > n  # one torch chunk: the comparison is of the kernel's threads, not chunking


def test_a_parameter_of_no_elements_is_counted_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    empty = torch.zeros(0)
    kernel, torch_path = both_paths(empty, empty.double(), empty, (empty, 0.1), monkeypatch)
    assert kernel == torch_path and (kernel.lost, kernel.eps_dominated, kernel.numel) == (0, 0, 0)
