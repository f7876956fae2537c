"""TF32 emulation: TF32 has no torch dtype, so its rounding is emulated on fp32 bit patterns."""

from __future__ import annotations

import torch

#: TF32 keeps fp32's 8 exponent bits and stores 10 of its 23 mantissa bits (the definition of the format).
TF32_MANTISSA_BITS = 10
_FP32_MANTISSA_BITS = 23
_DROPPED_BITS = _FP32_MANTISSA_BITS - TF32_MANTISSA_BITS
_HALF_ULP = 1 << (_DROPPED_BITS - 1)
_KEEP_MASK = ~((1 << _DROPPED_BITS) - 1)


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round to TF32 (10 mantissa bits, fp32 range), to nearest with ties away from zero, as cuBLAS does.

    Inputs of other floating dtypes are rounded to fp32 first (that is what reaches a TF32 matmul);
    the result has the input's dtype. Non-finite values pass through unchanged.
    """
    x32 = x.to(torch.float32)
    bits = x32.view(torch.int32)
    # Sign-magnitude encoding: adding half an ulp to the magnitude bits and truncating rounds half away
    # from zero, and a carry out of the mantissa correctly bumps the exponent (up to inf).
    rounded = ((bits & 0x7FFFFFFF) + _HALF_ULP) & _KEEP_MASK | (bits & ~0x7FFFFFFF)
    out = torch.where(torch.isfinite(x32), rounded.view(torch.float32), x32)
    return out.to(x.dtype)
