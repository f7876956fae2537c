"""What casting to a format does to each value: underflow, subnormal, normal or overflow.

The thresholds are not formulas typed in: for every (format, source dtype) pair they are found by
binary search over the source dtype's bit patterns, casting with the installed torch. A classification
therefore agrees with the real cast by construction, round-to-nearest-even ties and the double rounding
of fp64 inputs included (torch casts fp64 to fp16 through fp32). The property tests check it.

NB: casts are probed on the CPU with the current ``torch.set_flush_denormal`` setting, once per process;
flushing denormals changes how fp32 subnormals cast to bf16. NB: overflow of a saturating format (e4m3fn)
is the round-to-nearest threshold applied to the input; an fp64 input a hair below it that torch's
intermediate fp32 rounding lifts onto it saturates without being counted.

Examples:
    >>> import torch
    >>> from mpdiag import formats
    >>> from mpdiag.core.casting import Category, classify
    >>> x = torch.tensor([2.0**-25, 2.0**-24, 1.0, 65519.0, 65520.0, float("nan")])
    >>> [Category(int(c)).name for c in classify(x, formats.FP16)]
    ['UNDERFLOW', 'SUBNORMAL', 'NORMAL', 'NORMAL', 'OVERFLOW', 'NAN']
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mpdiag.core import formats as _formats
from mpdiag.core._tf32 import round_to_tf32
from mpdiag.core.errors import MpdiagError
from mpdiag.core.formats import Format

__all__ = ["Category", "CastThresholds", "thresholds", "classify", "round_to", "source_dtype", "SOURCE_DTYPES"]

#: Input dtypes whose casts are probed directly; other floating dtypes (fp8) widen to fp32 exactly first.
SOURCE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
#: The integer dtype of the same width as each source dtype: floats' bit patterns, for probing and kernels.
INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


class Category(enum.IntEnum):
    """What casting one value does. Codes are stable: they are stored in tensors."""

    ZERO = 0
    UNDERFLOW = 1  # non-zero finite value that becomes 0
    SUBNORMAL = 2
    NORMAL = 3
    OVERFLOW = 4  # finite value at or past the format's overflow threshold
    NAN = 5
    INF = 6


@dataclass(frozen=True)
class CastThresholds:
    """Magnitudes where a cast from ``source`` into ``fmt`` changes category.

    Each is the smallest non-negative value of the source dtype with that property, or ``inf`` when no
    finite value of the source dtype has it (nothing in fp16 overflows bf16).
    """

    fmt: Format
    source: torch.dtype
    nonzero_from: float
    normal_from: float
    overflow_from: float


def source_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor of ``dtype`` is classified in (exact widening for fp8 inputs)."""
    if dtype in SOURCE_DTYPES:
        return dtype
    if dtype.is_floating_point:
        return torch.float32
    raise MpdiagError(
        f"expected a floating-point dtype, got {dtype}; integer and bool tensors have no cast to classify"
    )


def cast(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The real cast into ``fmt`` (emulated for TF32), in the format's own dtype."""
    return round_to_tf32(x) if fmt.dtype is None else x.to(fmt.dtype)


def round_to(x: torch.Tensor, fmt: str | torch.dtype | Format) -> torch.Tensor:
    """The value of ``x`` after a round trip through ``fmt``, in ``x``'s dtype.

    For TF32 an emulation: fp32 range, 10 mantissa bits, round to nearest with ties away from zero (as
    cuBLAS does). Example:

        >>> round_to(torch.tensor([1.0 + 2.0**-11]), "fp16").item()
        1.0
    """
    return cast(x, _formats.get(fmt)).to(x.dtype)


@functools.cache
def thresholds(fmt: Format, source: torch.dtype) -> CastThresholds:
    """Probe the installed torch for where casting ``source`` values into ``fmt`` changes category."""
    source = source_dtype(source)

    def cast64(v: torch.Tensor) -> torch.Tensor:
        return cast(v, fmt).to(torch.float64)

    # Each predicate must hold from some magnitude upwards; a cast that overflows to NaN would break
    # "|cast| >= min_normal" at the top of the range, hence the isfinite terms.
    def nonzero(v: torch.Tensor) -> bool:
        return bool(cast64(v) != 0)

    def normal(v: torch.Tensor) -> bool:
        c = cast64(v)
        return bool((c.abs() >= fmt.min_normal) | ~torch.isfinite(c))

    def overflows(v: torch.Tensor) -> bool:
        # Past the round-to-nearest threshold is overflow whatever the cast then does (saturating
        # e4m3fn returns 448, older torch returns 448 at the tie and NaN beyond); and anything the
        # cast itself takes out of the finite range (fp64 inputs rounded twice) is overflow too.
        return bool(v.to(torch.float64) >= fmt.overflow_threshold) or not bool(torch.isfinite(cast64(v)))

    return CastThresholds(
        fmt=fmt,
        source=source,
        nonzero_from=_smallest_with(source, nonzero),
        normal_from=_smallest_with(source, normal),
        overflow_from=_smallest_with(source, overflows),
    )


def _smallest_with(source: torch.dtype, predicate: Callable[[torch.Tensor], bool]) -> float:
    """Smallest positive finite value of ``source`` where a monotone ``predicate`` holds (inf if none).

    Positive floats sort like their bit patterns, so this is a binary search over integers.
    """
    int_dtype = INT_VIEW[source]

    def value(bits: int) -> torch.Tensor:
        return torch.tensor([bits], dtype=int_dtype).view(source)

    lo = 1
    hi = int(torch.tensor([torch.finfo(source).max], dtype=source).view(int_dtype))
    if not predicate(value(hi)):
        return math.inf
    while lo < hi:
        mid = (lo + hi) // 2
        if predicate(value(mid)):
            hi = mid
        else:
            lo = mid + 1
    return float(value(lo).to(torch.float64))


def classify(x: torch.Tensor, fmt: str | torch.dtype | Format) -> torch.Tensor:
    """Element-wise ``Category`` codes (int8) of ``x`` as it would be after casting to ``fmt``.

    Non-finite inputs are NAN or INF, never OVERFLOW. Inputs of any floating dtype; fp64 inputs are
    judged by what torch's fp64 cast really does.

    Examples:
        >>> import torch
        >>> codes = classify(torch.tensor([0.0, 1e-8, 3e-6, 1.0, 7e4, float("nan")]), "fp16")
        >>> [Category(int(c)).name for c in codes]
        ['ZERO', 'UNDERFLOW', 'SUBNORMAL', 'NORMAL', 'OVERFLOW', 'NAN']
    """
    fmt = _formats.get(fmt)
    x = x.detach()
    src = source_dtype(x.dtype)
    x = x.to(src)
    t = thresholds(fmt, src)
    mag = x.abs()
    codes = torch.full(x.shape, int(Category.NORMAL), dtype=torch.int8, device=x.device)
    rules = (
        (mag >= t.overflow_from, Category.OVERFLOW),
        (mag < t.normal_from, Category.SUBNORMAL),
        (mag < t.nonzero_from, Category.UNDERFLOW),
        (mag == 0, Category.ZERO),
        (torch.isinf(x), Category.INF),
        (torch.isnan(x), Category.NAN),
    )
    for mask, category in rules:  # later rules win
        codes.masked_fill_(mask, int(category))
    return codes
