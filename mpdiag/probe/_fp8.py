"""Simulated fp8 matmuls for ``sensitivity``: what fp8 training recipes do to linear layers and matmuls.

No CPU, and few GPUs, run fp8 GEMMs through torch's autocast, so ``sensitivity(..., "fp8_e4m3")``
simulates them. Under bf16 autocast (which the rest of the model runs in, as fp8 recipes have it), each
linear layer and matmul (``F.linear``, ``matmul``/``@``, ``mm``, ``bmm``, ``addmm``, ``baddbmm``):

- casts both operands (the input and the weight; not the bias) through the fp8 format with per-tensor
  current scaling: scaled by the power of two that brings that tensor's amax closest to the format's
  max without passing it, rounded to fp8 by torch's own cast, scaled back;
- multiplies them in fp32 (the products of fp8 values are exact there, and fp8 GEMMs accumulate in
  fp32), adds the bias in fp32, and rounds the result to bf16, the output an fp8 GEMM writes.


``torch.einsum`` of two or more float operands is simulated the same way. Matmuls of integers or fp64 are
left alone, as autocast leaves them. Everything else runs as bf16 autocast runs it: attention's fused
kernel (``scaled_dot_product_attention``), convolutions, normalisation, the loss; and so do matmuls
inside composite torch functions that a mode sees only from the outside, above all
``F.multi_head_attention_forward`` (``nn.MultiheadAttention`` and the ``nn.Transformer`` layers): their
projections are not simulated. Where autocast is off (inside ``keep_fp32``, the fp32 reference),
nothing is simulated. Delayed scaling (an amax history), per-block scaling (MX formats) and fp8
attention are not simulated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mpdiag.record import autocast_dtype

__all__ = ["Fp8Matmuls", "fake_quantize", "scale_for"]

#: Each simulated function and the positions of its two operands.
_OPERANDS: dict[Callable[..., Any], tuple[int, int]] = {
    F.linear: (0, 1),
    torch.matmul: (0, 1),
    torch.Tensor.matmul: (0, 1),  # also what ``a @ b`` dispatches as
    torch.mm: (0, 1),
    torch.Tensor.mm: (0, 1),
    torch.bmm: (0, 1),
    torch.Tensor.bmm: (0, 1),
    torch.addmm: (1, 2),
    torch.Tensor.addmm: (1, 2),
    torch.baddbmm: (1, 2),
    torch.Tensor.baddbmm: (1, 2),
}


def fake_quantize(x: torch.Tensor, fp8: torch.dtype) -> torch.Tensor:
    """``x`` through ``fp8`` with per-tensor current scaling, back in fp32.

    The scale is the largest power of two that keeps the tensor's largest magnitude within the
    format's largest finite value, so nothing saturates and scaling is exact: the result is torch's
    own cast of the scaled tensor, scaled back. (Recipes that scale by ``max / amax`` exactly gain
    under one bit at the top of the range.) A tensor of zeros, or one with NaN/inf, is cast unscaled
    (its NaN/inf stay).

    Examples:
        >>> import torch
        >>> fake_quantize(torch.tensor([0.001, 1.1, 448.0]), torch.float8_e4m3fn).tolist()  # amax 448: unscaled
        [0.001953125, 1.125, 448.0]
        >>> fake_quantize(torch.tensor([0.001, 1.1, 224.0]), torch.float8_e4m3fn).tolist()  # scaled by 2
        [0.0009765625, 1.125, 224.0]
    """
    x = x.detach().float()
    scale = scale_for(x, fp8)
    return (x * scale).to(fp8).float() / scale


#: The largest scale used: 2^126 is an fp32 normal, so a tensor of subnormal fp32 values still scales exactly.
_MAX_SCALE_EXPONENT = 126


def scale_for(x: torch.Tensor, fp8: torch.dtype) -> float:
    """The power of two ``fake_quantize`` scales ``x`` by before the cast (1 for zeros or NaN/inf)."""
    amax = float(x.detach().abs().amax()) if x.numel() else 0.0
    if not 0 < amax < math.inf:
        return 1.0
    return 2.0 ** min(math.floor(math.log2(torch.finfo(fp8).max / amax)), _MAX_SCALE_EXPONENT)


#: The dtypes autocast would compute a matmul of in low precision: others (integers, fp64) are left alone.
_SIMULATED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _operands(func: Any, args: Sequence[Any]) -> tuple[int, ...]:
    """The positions of the operands to cast through fp8, or () where ``func`` is not simulated here."""
    if func is torch.einsum:  # einsum(equation, *operands): each tensor operand
        positions: tuple[int, ...] = tuple(i for i in range(1, len(args)) if isinstance(args[i], torch.Tensor))
    else:
        positions = tuple(i for i in _OPERANDS.get(func, ()) if i < len(args) and isinstance(args[i], torch.Tensor))
    if len(positions) < 2 or any(args[i].dtype not in _SIMULATED_DTYPES for i in positions):
        return ()
    return positions


class Fp8Matmuls(TorchFunctionMode):
    """While active: linear layers and matmuls where autocast is on for ``device_type`` compute as fp8
    GEMMs would (see the module docstring); everything else is left to autocast."""

    def __init__(self, fp8: torch.dtype, device_type: str) -> None:
        super().__init__()
        self.fp8, self.device_type = fp8, device_type

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        operands = _operands(func, args)
        low = autocast_dtype(self.device_type) if operands else None
        if not operands or low is None:  # not a matmul of low-precision floats, or autocast off here
            return func(*args, **kwargs)
        args = list(args)
        for i in operands:
            args[i] = fake_quantize(args[i], self.fp8)
        wide = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        with torch.autocast(self.device_type, enabled=False):
            out = func(*wide, **{k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        return out.to(getattr(torch, low))
