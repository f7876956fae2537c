"""Cost per element of measuring one CPU tensor: the compiled kernel against the same counts without numba.

Three paths with identical statistics (the tests check the kernel and the torch ops; this benchmark
checks the bincount counter against the kernel before timing it): the numba kernel, the torch-only
bincount counter of ``_torch_counter`` (the kernel's idea in torch ops: what dropping numba would leave),
and the bucketize-based torch ops that GPUs without Triton take. It shows what numba buys. Each kind
of tensor is measured by each path in interleaved rounds; the figures are medians over rounds, and the
ratios are the medians of (path / kernel) within a round.

Run: python benchmarks/cpu_kernel.py [--rounds N] [--numel N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator

import _torch_counter
import torch

from mpdiag.record import _accumulate, _cpu_kernel
from mpdiag.record._layout import layout_for

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


PATHS = ("kernel", "bincount", "torch ops")


@contextlib.contextmanager
def measured_by(path: str) -> Iterator[None]:
    """``_accumulate.measure`` taking one path: the numba kernel, the torch-only bincount counter
    (``_torch_counter``, the same idea without numba) or the torch ops GPUs without Triton take."""
    real_choice, real_count = _accumulate.use_cpu_kernel, _cpu_kernel.count_into
    _accumulate.use_cpu_kernel = lambda: path != "torch ops"
    if path == "bincount":
        _cpu_kernel.count_into = _torch_counter.count_into
    try:
        yield
    finally:
        _accumulate.use_cpu_kernel, _cpu_kernel.count_into = real_choice, real_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--numel", type=int, default=1 << 17)
    args = parser.parse_args()
    if not _cpu_kernel.available():
        raise SystemExit("the numba kernel is not available: pip install 'mpdiag[fast]' (and unset MPDIAG_NUMBA=0)")
    kinds = tensors(args.numel)
    for x in kinds.values():
        _torch_counter.check(x, layout_for(x.dtype, FORMATS))
        _accumulate.measure(x, FORMATS)
    _cpu_kernel.finish_compiling()  # large tensors: the threaded kernel, compiled in the background
    times: dict[tuple[str, str], list[float]] = {(kind, path): [] for kind in kinds for path in PATHS}
    for _ in range(args.rounds):
        for kind, x in kinds.items():
            for path in PATHS:
                with measured_by(path):
                    repeat = 2 if path == "torch ops" else 10
                    times[(kind, path)].append(
                        per_element(functools.partial(_accumulate.measure, x, FORMATS), x.numel(), repeat)
                    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.numel} elements per tensor, "
        f"{args.rounds} rounds; ns per element; ratios: the median within a round of path / kernel"
    )
    print(f"{'tensor':>22} {'kernel':>8} {'bincount':>9} {'ratio':>6} {'torch ops':>10} {'ratio':>6}")
    for kind in kinds:
        kernel, bincount, ops = (times[(kind, path)] for path in PATHS)
        ratio_b = statistics.median(b / k for b, k in zip(bincount, kernel))
        ratio_o = statistics.median(o / k for o, k in zip(ops, kernel))
        print(
            f"{kind:>22} {statistics.median(kernel):8.2f} {statistics.median(bincount):9.2f} {ratio_b:5.1f}x "
            f"{statistics.median(ops):10.2f} {ratio_o:5.1f}x"
        )


if __name__ == "__main__":
    main()
