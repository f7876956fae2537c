"""Format constants against torch.finfo and their defining identities; name lookup."""

from __future__ import annotations

import math

import pytest
import torch

from mpdiag.core import formats
from mpdiag.core.errors import MpdiagError, UnknownFormatError
from mpdiag.core.formats import Overflow

DTYPE_FORMATS = [f for f in formats.all_formats() if f.dtype is not None]


def test_every_format_is_present() -> None:
    assert formats.names() == ("fp32", "tf32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2")
    assert formats.FP8_E4M3.dtype is torch.float8_e4m3fn and formats.FP8_E5M2.dtype is torch.float8_e5m2
    assert formats.TF32.dtype is None


@pytest.mark.parametrize("fmt", DTYPE_FORMATS, ids=str)
def test_constants_match_finfo(fmt: formats.Format) -> None:
    info = torch.finfo(fmt.dtype)
    assert fmt.max == info.max and fmt.min_normal == info.smallest_normal and fmt.eps == info.eps
    assert fmt.bits == info.bits


@pytest.mark.parametrize("fmt", formats.all_formats(), ids=str)
def test_defining_identities(fmt: formats.Format) -> None:
    assert fmt.eps == 2.0**-fmt.mantissa_bits
    assert fmt.min_subnormal == fmt.min_normal * fmt.eps
    # min normal is 2^(1 - bias); the largest exponent is bias, or bias + 1 for formats without inf (e4m3fn)
    bias = 2 ** (fmt.exponent_bits - 1) - 1
    assert fmt.min_normal == 2.0 ** (1 - bias)
    top = math.frexp(fmt.max)[1] - 1
    assert top in (bias, bias + 1)
    assert fmt.min_normal <= 1.0 <= fmt.max
    assert fmt.overflow_threshold > fmt.max


@pytest.mark.parametrize("fmt", DTYPE_FORMATS, ids=str)
def test_values_are_representable_and_extreme(fmt: formats.Format) -> None:
    src = torch.float64 if fmt.dtype in (torch.float32,) else torch.float32
    values = torch.tensor([fmt.max, fmt.min_normal, fmt.min_subnormal, 1.0 + fmt.eps], dtype=src)
    assert torch.equal(values.to(fmt.dtype).to(src), values)
    below_min_subnormal = torch.tensor([fmt.min_subnormal / 2], dtype=src)  # a tie, rounds to even zero
    assert below_min_subnormal.to(fmt.dtype).item() == 0


@pytest.mark.parametrize("fmt", DTYPE_FORMATS, ids=str)
def test_overflow_behaviour_is_what_the_installed_torch_does(fmt: formats.Format) -> None:
    src = torch.float64 if fmt.dtype is torch.float32 else torch.float32
    result = torch.tensor([fmt.overflow_threshold * 2], dtype=src).to(fmt.dtype).to(torch.float64)
    expected = {Overflow.INF: math.inf, Overflow.SATURATE: fmt.max}
    if fmt.overflow is Overflow.NAN:
        assert torch.isnan(result).all()
    else:
        assert result.item() == expected[fmt.overflow]


def test_known_facts_of_torch_2_13() -> None:
    # From ../shared/NUMERICS.md; the derivation above must reproduce them.
    assert formats.FP16.overflow_threshold == 65520.0
    assert formats.FP8_E4M3.overflow_threshold == 464.0
    assert formats.FP8_E5M2.overflow_threshold == 61440.0
    assert formats.FP8_E4M3.max == 448.0


def test_tf32_constants() -> None:
    tf32, fp32 = formats.TF32, formats.FP32
    assert (tf32.exponent_bits, tf32.mantissa_bits) == (8, 10)
    assert tf32.min_normal == fp32.min_normal and tf32.eps == 2.0**-10
    assert tf32.max == (2 - 2.0**-10) * 2.0**127
    assert tf32.overflow is Overflow.INF


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("fp16", "fp16"),
        ("half", "fp16"),
        ("float16", "fp16"),
        (torch.float16, "fp16"),
        ("FP16", "fp16"),
        ("bf16", "bf16"),
        ("bfloat16", "bf16"),
        (torch.bfloat16, "bf16"),
        ("e4m3", "fp8_e4m3"),
        ("float8_e4m3fn", "fp8_e4m3"),
        (torch.float8_e4m3fn, "fp8_e4m3"),
        ("e5m2", "fp8_e5m2"),
        ("fp8-e5m2", "fp8_e5m2"),
        (torch.float8_e5m2, "fp8_e5m2"),
        ("float32", "fp32"),
        (torch.float32, "fp32"),
        ("tf32", "tf32"),
        ("torch.float16", "fp16"),
    ],
)
def test_get_accepts_names_aliases_and_dtypes(spec: object, name: str) -> None:
    assert formats.get(spec).name == name
    assert formats.get(formats.get(spec)) is formats.get(spec)


@pytest.mark.parametrize("spec", ["fp12", "", torch.int8, torch.float64, 16, None])
def test_get_rejects_anything_else_listing_valid_names(spec: object) -> None:
    with pytest.raises(UnknownFormatError, match="unknown numeric format .*; expected one of") as info:
        formats.get(spec)
    assert isinstance(info.value, MpdiagError)
    for name in formats.names():
        assert name in str(info.value)
