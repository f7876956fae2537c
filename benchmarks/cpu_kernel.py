"""Cost per element of measuring one CPU tensor: the compiled kernel against the same counts with torch ops.

Both paths give identical statistics (the tests check it); this shows what the kernel buys. Each kind
of tensor is measured by both paths in interleaved rounds; the figures are medians over rounds, and the
ratio is the median of (torch ops / kernel) within a round.

Run: python benchmarks/cpu_kernel.py [--rounds N] [--numel N]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from mpdiag.record import _accumulate, _cpu_kernel

FORMATS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")


def tensors(numel: int) -> dict[str, torch.Tensor]:
    """Kinds of tensors training produces: they reach different parts of the kernel."""
    torch.manual_seed(0)
    x = torch.randn(numel)
    return {
        "activations N(0,1)": x,
        "gradients N(0,1e-4)": x * 1e-4,  # near fp16's subnormal range: keys that hold cast thresholds
        "dropout output": torch.nn.functional.dropout(x, 0.1),  # zeros among the values
        "wide range": x * torch.exp(torch.randn(numel) * 8),  # fp32 subnormals and huge values
        "bf16 activations": x.bfloat16(),
        "fp16 gradients": (x * 1e-4).half(),
    }


def per_element(measure: Callable[[], object], numel: int, repeat: int) -> float:
    measure()
    start = time.perf_counter()
    for _ in range(repeat):
        measure()
    return (time.perf_counter() - start) / repeat / numel * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--numel", type=int, default=1 << 17)
    args = parser.parse_args()
    if not _cpu_kernel.available():
        raise SystemExit("the numba kernel is not available: pip install 'mpdiag[fast]' (and unset MPDIAG_NUMBA=0)")
    real_choice = _accumulate.use_cpu_kernel
    kinds = tensors(args.numel)
    times: dict[tuple[str, bool], list[float]] = {(kind, k): [] for kind in kinds for k in (True, False)}
    try:
        for _ in range(args.rounds):
            for kind, x in kinds.items():
                for kernel in (True, False):
                    _accumulate.use_cpu_kernel = lambda kernel=kernel: kernel
                    repeat = 10 if kernel else 2
                    times[(kind, kernel)].append(
                        per_element(functools.partial(_accumulate.measure, x, FORMATS), x.numel(), repeat)
                    )
    finally:
        _accumulate.use_cpu_kernel = real_choice
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.numel} elements per tensor, "
        f"{args.rounds} rounds; ns per element"
    )
    print(f"{'tensor':>22} {'kernel':>8} {'torch ops':>10} {'ratio':>7}")
    for kind in kinds:
        kernel, ops = times[(kind, True)], times[(kind, False)]
        ratio = statistics.median(o / k for o, k in zip(ops, kernel))
        print(f"{kind:>22} {statistics.median(kernel):8.2f} {statistics.median(ops):10.2f} {ratio:6.1f}x")


if __name__ == "__main__":
    main()
