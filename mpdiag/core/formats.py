"""Numeric formats that mixed-precision training casts to, with constants derived from ``torch.finfo``.

Every constant is computed from ``torch.finfo`` of the format's dtype (TF32, which has no dtype, from
fp32's finfo and its 10 mantissa bits). What an overflowing value becomes is found by casting one with
the installed torch, because that changed between releases (fp8 e4m3fn gave NaN, torch 2.13 saturates).

Examples:
    >>> from mpdiag import formats
    >>> fp16 = formats.get("half")
    >>> fp16.name, fp16.max, fp16.min_normal, fp16.overflow_threshold
    ('fp16', 65504.0, 6.103515625e-05, 65520.0)
    >>> formats.get(torch.bfloat16).exponent_bits
    8
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass

import torch

from mpdiag.core._tf32 import TF32_MANTISSA_BITS, round_to_tf32
from mpdiag.core.errors import UnknownFormatError

__all__ = [
    "Format",
    "Overflow",
    "get",
    "names",
    "all_formats",
    "power_of_two",
    "flush_exponent",
    "FP32",
    "TF32",
    "FP16",
    "BF16",
    "FP8_E4M3",
    "FP8_E5M2",
]


class Overflow(str, enum.Enum):
    """What a cast turns a value beyond the finite range into."""

    INF = "inf"
    NAN = "nan"
    SATURATE = "saturate"


@dataclass(frozen=True)
class Format:
    """A floating-point format: its bit layout, range and overflow behaviour.

    Attributes:
        name: canonical name ("fp16", "fp8_e4m3", ...).
        dtype: the torch dtype, or None for TF32 (a matmul mode, not a storage type).
        exponent_bits, mantissa_bits: bit layout (mantissa without the implicit leading bit).
        max: largest finite value.
        min_normal: smallest positive normal value.
        min_subnormal: smallest positive subnormal value.
        eps: spacing between 1.0 and the next value.
        overflow: what a cast makes of a value past the finite range.
    """

    name: str
    dtype: torch.dtype | None
    exponent_bits: int
    mantissa_bits: int
    max: float
    min_normal: float
    min_subnormal: float
    eps: float
    overflow: Overflow

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def overflow_threshold(self) -> float:
        """Smallest magnitude that round-to-nearest carries out of the finite range: max + half an ulp.

        A value exactly half an ulp above max is a tie; it leaves the range (fp16: 65520 becomes inf).
        Saturating formats map it to max instead, but it is still past what the format represents.
        """
        top_exponent = math.frexp(self.max)[1] - 1
        return self.max + math.ldexp(1.0, top_exponent - self.mantissa_bits - 1)

    def __str__(self) -> str:
        return self.name


def _from_finfo(name: str, dtype: torch.dtype) -> Format:
    info = torch.finfo(dtype)
    mantissa_bits = -math.frexp(info.eps)[1] + 1
    return Format(
        name=name,
        dtype=dtype,
        exponent_bits=info.bits - 1 - mantissa_bits,
        mantissa_bits=mantissa_bits,
        max=float(info.max),
        min_normal=float(info.smallest_normal),
        min_subnormal=float(info.smallest_normal) * float(info.eps),
        eps=float(info.eps),
        overflow=_probe_overflow(dtype, float(info.max)),
    )


def _probe_overflow(dtype: torch.dtype, max_finite: float) -> Overflow:
    """Cast a value far past ``max_finite`` with the installed torch and see what comes out."""
    source = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    far_beyond = torch.tensor([max_finite * 4.0], dtype=source)
    return _classify_overflow_result(far_beyond.to(dtype).to(torch.float64)[0], max_finite)


def _classify_overflow_result(value: torch.Tensor, max_finite: float) -> Overflow:
    if torch.isnan(value):
        return Overflow.NAN
    if torch.isinf(value):
        return Overflow.INF
    if float(value) == max_finite:
        return Overflow.SATURATE
    raise RuntimeError(f"casting past the finite range gave {float(value)}, expected inf, nan or {max_finite}")


def _tf32() -> Format:
    fp32 = torch.finfo(torch.float32)
    eps = math.ldexp(1.0, -TF32_MANTISSA_BITS)
    top_exponent = math.frexp(float(fp32.max))[1] - 1
    max_finite = math.ldexp(2.0 - eps, top_exponent)
    probe = round_to_tf32(torch.tensor([float(fp32.max)]))[0].to(torch.float64)
    return Format(
        name="tf32",
        dtype=None,
        exponent_bits=fp32.bits - 1 - (-math.frexp(float(fp32.eps))[1] + 1),
        mantissa_bits=TF32_MANTISSA_BITS,
        max=max_finite,
        min_normal=float(fp32.smallest_normal),
        min_subnormal=float(fp32.smallest_normal) * eps,
        eps=eps,
        overflow=_classify_overflow_result(probe, max_finite),
    )


FP32 = _from_finfo("fp32", torch.float32)
TF32 = _tf32()
FP16 = _from_finfo("fp16", torch.float16)
BF16 = _from_finfo("bf16", torch.bfloat16)
FP8_E4M3 = _from_finfo("fp8_e4m3", torch.float8_e4m3fn)
FP8_E5M2 = _from_finfo("fp8_e5m2", torch.float8_e5m2)

_FORMATS: dict[str, Format] = {f.name: f for f in (FP32, TF32, FP16, BF16, FP8_E4M3, FP8_E5M2)}
_ALIASES: dict[str, str] = {
    "float32": "fp32",
    "float": "fp32",
    "single": "fp32",
    "f32": "fp32",
    "tensorfloat32": "tf32",
    "tensor_float32": "tf32",
    "float16": "fp16",
    "half": "fp16",
    "f16": "fp16",
    "bfloat16": "bf16",
    "brain_float16": "bf16",
    "e4m3": "fp8_e4m3",
    "e4m3fn": "fp8_e4m3",
    "fp8e4m3": "fp8_e4m3",
    "float8_e4m3fn": "fp8_e4m3",
    "fp8_e4m3fn": "fp8_e4m3",
    "e5m2": "fp8_e5m2",
    "fp8e5m2": "fp8_e5m2",
    "float8_e5m2": "fp8_e5m2",
}


def power_of_two(value: float) -> str:
    """``value`` as people read format constants: '2^-14' for a power of two, else 6 significant digits."""
    mantissa, exponent = math.frexp(value)
    return f"2^{exponent - 1}" if mantissa == 0.5 else f"{value:.6g}"


def flush_exponent(fmt: Format) -> int:
    """log2 of the largest magnitude that rounds to zero: half the smallest subnormal (a tie to even 0)."""
    return math.frexp(fmt.min_subnormal)[1] - 2


def names() -> tuple[str, ...]:
    """Canonical names of every known format, narrowest range last."""
    return tuple(_FORMATS)


def all_formats() -> tuple[Format, ...]:
    return tuple(_FORMATS.values())


def get(spec: str | torch.dtype | Format) -> Format:
    """The format named by ``spec``: a canonical name, a common alias, a torch dtype or a Format.

    Raises:
        UnknownFormatError: naming the valid names, for anything else.
    """
    if isinstance(spec, Format):
        return spec
    if isinstance(spec, torch.dtype):
        return _by_dtype().get(spec) or _unknown(spec)
    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_").replace("torch.", "")
        return _FORMATS.get(_ALIASES.get(key, key)) or _unknown(spec)
    return _unknown(spec)


@functools.cache
def _by_dtype() -> dict[torch.dtype, Format]:
    return {f.dtype: f for f in _FORMATS.values() if f.dtype is not None}


def _unknown(spec: object) -> Format:
    raise UnknownFormatError(
        f"unknown numeric format {spec!r}; expected one of {', '.join(names())} "
        f"(or an alias such as 'half', 'bfloat16', 'e4m3', or a torch dtype)"
    )
