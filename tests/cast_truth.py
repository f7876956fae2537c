"""Ground truth for cast classification: what torch's real cast does, element by element."""

from __future__ import annotations

import torch

from mpdiag.core.casting import Category, cast, source_dtype
from mpdiag.core.formats import Format

INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def from_bits(bits: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Floats of ``dtype`` with the given bit patterns (unsigned ints are wrapped to signed)."""
    width = torch.finfo(dtype).bits
    signed = [b - (1 << width) if b >= 1 << (width - 1) else b for b in bits]
    return torch.tensor(signed, dtype=INT_VIEW[dtype]).view(dtype)


def neighbours(value: float, dtype: torch.dtype, reach: int = 2) -> list[float]:
    """``value`` (rounded into dtype) and the values up to ``reach`` ulps either side, both signs."""
    base = int(torch.tensor([abs(value)], dtype=dtype).view(INT_VIEW[dtype]))
    top = int(torch.tensor([torch.finfo(dtype).max], dtype=dtype).view(INT_VIEW[dtype]))
    out = []
    for b in range(max(base - reach, 0), min(base + reach, top) + 1):
        v = float(from_bits([b], dtype).to(torch.float64))
        out += [v, -v]
    return out


def real_categories(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Category codes from the real cast (emulation for TF32), computed independently of mpdiag's thresholds.

    Overflow is by definition at or past the format's round-to-nearest threshold, or wherever the
    cast itself leaves the finite range; there the cast must give inf, NaN or (saturating) max, and
    nowhere else may it give a non-finite value.
    """
    x = x.to(source_dtype(x.dtype))
    c = cast(x, fmt).to(torch.float64)
    codes = torch.full(x.shape, int(Category.NORMAL), dtype=torch.int8)
    codes[c.abs() < fmt.min_normal] = Category.SUBNORMAL
    codes[c == 0] = Category.UNDERFLOW
    finite_input = torch.isfinite(x)
    past = finite_input & ((x.to(torch.float64).abs() >= fmt.overflow_threshold) | ~torch.isfinite(c))
    became = c[past]
    assert torch.all(~torch.isfinite(became) | (became.abs() == fmt.max)), became
    assert torch.all(torch.isfinite(c[finite_input & ~past]))
    codes[past] = Category.OVERFLOW
    codes[x == 0] = Category.ZERO
    codes[torch.isinf(x)] = Category.INF
    codes[torch.isnan(x)] = Category.NAN
    return codes


def fp32_values_near_every_threshold() -> list[float]:
    """Every tracked format's fp32 cast thresholds and constants with their fp32 neighbours."""
    import math

    from mpdiag.core import formats
    from mpdiag.core.casting import thresholds

    values: list[float] = []
    for fmt in formats.all_formats():
        t = thresholds(fmt, torch.float32)
        for v in (t.nonzero_from, t.normal_from, t.overflow_from, fmt.max, fmt.min_normal, fmt.min_subnormal):
            if math.isfinite(v) and v <= torch.finfo(torch.float32).max:
                values += neighbours(v, torch.float32, reach=2)
    return values
