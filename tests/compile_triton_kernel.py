"""Compiles mpdiag's Triton kernel for GPUs this machine need not have (run by test_triton_kernel.py with
TRITON_INTERPRET=0); prints one ``<dtype>@sm<capability>`` per kernel compiled."""

from __future__ import annotations

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mpdiag.record import _accumulate, _triton_kernel
from mpdiag.record._layout import layout_for

FORMATS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "tf32", "fp32")
BITS = {torch.float64: "*i64", torch.float32: "*i32", torch.float16: "*i16", torch.bfloat16: "*i16"}


def main() -> None:
    source = _triton_kernel._kernel_source(interpret=False)
    amax_at, neg_amin_at = _accumulate._TRITON_SLOTS
    for dtype, pointer in BITS.items():
        layout = layout_for(dtype, FORMATS)
        tables = _triton_kernel._DeviceTables(_triton_kernel.tables_for(layout), torch.device("cpu"))
        constants = dict(tables.constants, AMAX_AT=amax_at, NEG_AMIN_AT=neg_amin_at, BLOCK=_triton_kernel._BLOCK)
        signature = {
            "bits_ptr": pointer,
            "n": "i32",
            "key_ptr": "*i32",
            "boundaries_ptr": "*i64" if dtype == torch.float64 else "*i32",
            "out_ptr": "*i64",
            **dict.fromkeys(constants, "constexpr"),
        }
        for capability in (90, 80):
            compiled = triton.compile(
                ASTSource(fn=source.count_kernel, signature=signature, constexprs=constants),
                target=GPUTarget("cuda", capability, 32),
                options={"num_warps": _triton_kernel._NUM_WARPS},
            )
            # the one merge per program into global memory is there: atomics, not a store per element
            assert "atom.global" in compiled.asm["ptx"], "no global atomics in the compiled kernel"
            print(f"{dtype}@sm{capability}")


if __name__ == "__main__":
    main()
