"""classify() and round_to() against torch's real casts: exhaustive for 16-bit inputs, property-based for fp32/fp64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cast_truth import fp32_values_near_every_threshold, from_bits, neighbours, real_categories
from hypothesis import given
from hypothesis import strategies as st

from mpdiag.core import formats
from mpdiag.core.casting import Category, classify, round_to, thresholds
from mpdiag.core.errors import MpdiagError

ALL = formats.all_formats()
WITH_DTYPE = [f for f in ALL if f.dtype is not None]


def _interesting(fmt: formats.Format, source: torch.dtype) -> list[float]:
    """Specials, every tracked threshold and format constant, their neighbours, and halfway points."""
    t = thresholds(fmt, source)
    values = [0.0, -0.0, math.inf, -math.inf, math.nan]
    for v in (
        t.nonzero_from,
        t.normal_from,
        t.overflow_from,
        fmt.max,
        fmt.min_normal,
        fmt.min_subnormal,
        fmt.overflow_threshold,
        fmt.min_subnormal / 2,
        fmt.min_normal - fmt.min_subnormal / 2,
        1.0,
    ):
        if math.isfinite(v) and abs(v) <= torch.finfo(source).max:
            values += neighbours(v, source)
    return values


def _check(x: torch.Tensor, fmt: formats.Format) -> None:
    got, want = classify(x, fmt), real_categories(x, fmt)
    bad = (got != want).nonzero().flatten()[:5].tolist()
    assert not bad, [(x[i].item(), Category(int(got[i])).name, Category(int(want[i])).name) for i in bad]


@pytest.mark.parametrize("source", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ALL, ids=str)
def test_classify_is_exact_for_every_16_bit_value(fmt: formats.Format, source: torch.dtype) -> None:
    _check(torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(source), fmt)


@pytest.mark.parametrize("fmt", ALL, ids=str)
@pytest.mark.parametrize("source", [torch.float32, torch.float64], ids=str)
def test_classify_is_exact_at_thresholds_neighbours_and_specials(fmt: formats.Format, source: torch.dtype) -> None:
    _check(torch.tensor(_interesting(fmt, source), dtype=source), fmt)


def _fp32_values() -> st.SearchStrategy[float]:
    """Arbitrary fp32 values, weighted towards where casts are decided: +-0, +-inf, NaN (with payloads),
    fp32 subnormals, every format's thresholds and their fp32 neighbours, and midpoints between those.
    (The formats' own halfway points, the ties, have a test of their own below.)"""
    near = fp32_values_near_every_threshold()
    as_fp32 = st.integers(0, 2**32 - 1).map(lambda b: float(from_bits([b], torch.float32).double()))
    return st.one_of(
        st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan]),
        st.integers(0x7F800001, 0x7FFFFFFF).map(lambda b: float(from_bits([b], torch.float32).double())),
        st.integers(1, 0x007FFFFF).map(lambda b: float(from_bits([b], torch.float32).double())),
        st.sampled_from(near),
        st.tuples(st.sampled_from(near), st.sampled_from(near)).map(lambda ab: (ab[0] + ab[1]) / 2),
        as_fp32,
    )


@pytest.mark.parametrize("fmt", ALL, ids=str)
@given(values=st.lists(_fp32_values(), min_size=1, max_size=64))
def test_classify_matches_real_cast_for_any_fp32_value(fmt: formats.Format, values: list[float]) -> None:
    _check(torch.tensor(values, dtype=torch.float64).float(), fmt)


def _halfway_points(fmt: formats.Format) -> st.SearchStrategy[float]:
    """Midpoints between adjacent values of the format: exactly the ties round-to-nearest-even decides."""
    top = (
        int(
            torch.tensor([fmt.max], dtype=torch.float64)
            .to(fmt.dtype)
            .view(torch.int8 if fmt.bits == 8 else torch.int16)
            .to(torch.int32)
        )
        if fmt.bits <= 16
        else 2**30
    )

    def midpoint(b: int) -> float:
        if fmt.dtype is torch.float32 or fmt.dtype is None:
            lo = float(from_bits([b], torch.float32).double())
            hi = float(from_bits([b + 1], torch.float32).double())
        else:
            view = torch.int8 if fmt.bits == 8 else torch.int16
            pair = torch.tensor([b, b + 1], dtype=torch.int32).to(view).view(fmt.dtype).double()
            lo, hi = float(pair[0]), float(pair[1])
        return (lo + hi) / 2

    return st.integers(0, top).map(midpoint)


@pytest.mark.parametrize("fmt", WITH_DTYPE, ids=str)
@given(data=st.data())
def test_classify_at_the_formats_own_ties(fmt: formats.Format, data: st.DataObject) -> None:
    values = data.draw(st.lists(_halfway_points(fmt), min_size=1, max_size=32))
    x = torch.tensor(values, dtype=torch.float64)
    for source in (torch.float32, torch.float64):
        _check(x.to(source), fmt)


@pytest.mark.parametrize("fmt", ALL, ids=str)
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1, max_size=64))
def test_classify_fp64_inputs_follows_the_real_double_rounding(fmt: formats.Format, values: list[float]) -> None:
    _check(torch.tensor(values, dtype=torch.float64), fmt)


def test_known_fp16_boundaries() -> None:
    up, down = np.float32(1), np.float32(0)
    x = torch.tensor(
        [
            2.0**-25,
            np.nextafter(np.float32(2.0**-25), up),
            2.0**-14 - 2.0**-25,
            np.nextafter(np.float32(2.0**-14 - 2.0**-25), down),
            65519.99609375,
            65520.0,
            -65520.0,
        ],
        dtype=torch.float32,
    )
    names = [Category(int(c)).name for c in classify(x, "fp16")]
    assert names == ["UNDERFLOW", "SUBNORMAL", "NORMAL", "SUBNORMAL", "NORMAL", "OVERFLOW", "OVERFLOW"]


def test_fp64_is_rounded_twice_like_the_real_cast() -> None:
    # 2^-25 + 2^-60 rounds to 2^-24 in one step, but torch goes through fp32 (2^-25, a tie) and gets 0.
    x = torch.tensor([2.0**-25 + 2.0**-60], dtype=torch.float64)
    assert x.to(torch.float16).item() == 0.0
    assert classify(x, "fp16").item() == Category.UNDERFLOW


def test_e4m3_overflow_threshold_whatever_torch_does_past_it() -> None:
    x = torch.tensor([448.0, 463.99, 464.0, 1e6])
    assert [Category(int(c)).name for c in classify(x, "e4m3")] == ["NORMAL", "NORMAL", "OVERFLOW", "OVERFLOW"]


def test_fp8_inputs_widen_exactly() -> None:
    x = torch.tensor([1e-3, 0.5, 300.0]).to(torch.float8_e5m2)
    assert torch.equal(classify(x, "fp16"), classify(x.float(), "fp16"))


def test_classify_rejects_integer_tensors() -> None:
    with pytest.raises(MpdiagError, match="expected a floating-point dtype, got torch.int64"):
        classify(torch.arange(3), "fp16")


# -- round_to -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", WITH_DTYPE, ids=str)
def test_round_to_is_the_real_round_trip(fmt: formats.Format) -> None:
    x = torch.randn(1000) * 100
    assert torch.equal(round_to(x, fmt), x.to(fmt.dtype).to(torch.float32))
    assert round_to(x, fmt).dtype == x.dtype


fp32_values = st.floats(width=32, allow_nan=False, allow_infinity=True, allow_subnormal=True)


@given(st.lists(fp32_values, min_size=1, max_size=64))
def test_tf32_is_idempotent_and_keeps_fp32_range(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    once = round_to(x, "tf32")
    assert torch.equal(round_to(once, "tf32"), once)
    finite = torch.isfinite(once)
    assert torch.all(once[finite].abs() <= formats.TF32.max)
    # fp32's range: anything below tf32's overflow point stays finite, normals stay normal
    inside = x.abs() < formats.TF32.overflow_threshold
    assert torch.all(torch.isfinite(once[inside]))
    normal = x.abs() >= formats.FP32.min_normal
    assert torch.all(once[normal & inside].abs() >= formats.FP32.min_normal)


@given(st.lists(st.integers(0, 2**10 - 1), min_size=1, max_size=32), st.integers(-126, 127), st.booleans())
def test_tf32_leaves_values_with_10_mantissa_bits_alone(mantissas: list[int], exponent: int, negative: bool) -> None:
    x = torch.tensor([(1 + m / 1024) * 2.0**exponent * (-1 if negative else 1) for m in mantissas], dtype=torch.float64)
    x = x[torch.isfinite(x.float())].float()
    assert torch.equal(round_to(x, "tf32"), x)


def test_tf32_rounds_ties_away_from_zero() -> None:
    x = torch.tensor([1 + 2.0**-11, 1 + 3 * 2.0**-11, -(1 + 2.0**-11), 1 + 2.0**-11 - 2.0**-23])
    assert round_to(x, "tf32").tolist() == [1 + 2.0**-10, 1 + 2 * 2.0**-10, -(1 + 2.0**-10), 1.0]
