"""The precision of fp32 matmuls and convolutions (TF32 or not), set for a block and restored after.

torch >= 2.9 has per-backend ``fp32_precision`` settings, and once one of them is set the older calls
(``torch.get_float32_matmul_precision``, ``cudnn.allow_tf32``) raise: each torch gets its own API.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch

__all__ = ["Fp32Mode", "matmul_precision", "tf32_changes_matmuls"]

#: "ieee": fp32 matmuls and convolutions really in fp32; "tf32": TF32 tensor cores where the device has them.
Fp32Mode = Literal["ieee", "tf32"]

#: torch >= 2.9's per-backend fp32 precision settings ("ieee", "tf32", "bf16", "none": inherit).
_FP32_PRECISION_SETTINGS = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul",
                            "mkldnn.conv", "mkldnn.rnn")  # fmt: skip

#: torch < 2.9: ``set_float32_matmul_precision``'s word for each mode ("high" allows TF32).
_LEGACY_MATMUL = {"ieee": "highest", "tf32": "high"}


@contextlib.contextmanager
def matmul_precision(mode: Fp32Mode) -> Iterator[None]:
    """Inside, fp32 matmuls and convolutions on every backend (cuBLAS, cuDNN, oneDNN) run in ``mode``;
    every setting is restored after, also on error. "ieee" also turns off cuDNN's TF32 convolutions,
    which torch allows by default, and oneDNN's bf16 ("medium")."""
    if hasattr(torch.backends, "fp32_precision"):
        owners = [_backend(path) for path in _FP32_PRECISION_SETTINGS]
        owners = [o for o in owners if o is not None and hasattr(o, "fp32_precision")]
        before = [o.fp32_precision for o in owners]
        try:
            for o in owners:
                o.fp32_precision = mode
            yield
        finally:
            for o, value in zip(owners, before):
                o.fp32_precision = value
        return
    precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision(_LEGACY_MATMUL[mode])
    torch.backends.cudnn.allow_tf32 = mode == "tf32"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def tf32_changes_matmuls(device: torch.device) -> bool:
    """Whether TF32 mode changes an fp32 matmul on ``device`` at all: a probe matmul, compared bit for
    bit with the IEEE one (a CPU without TF32 units, or a GPU before Ampere, gives the same bits)."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(64, 64, generator=generator).to(device) for _ in range(2))
    with matmul_precision("ieee"):
        exact = a @ b
    with matmul_precision("tf32"):
        tf32 = a @ b
    return not torch.equal(exact, tf32)


def _backend(path: str) -> Any:
    owner: Any = torch.backends
    for part in filter(None, path.split(".")):
        owner = getattr(owner, part, None)
    return owner
