"""The update counts (``run.update_stats``) of one parameter: the compiled CPU kernel against the torch path.

Both count the same step of an fp32 weight (Adam-sized updates, fp16 and bf16 stalls, the ratio
histogram, the gradient and the eps share), in interleaved rounds; medians per element, and the ratio.
Sizes: one below the kernel's threading threshold (one thread) and a convnet's worth of weights.

Run: python benchmarks/update_kernel.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mpdiag.core.formats import Format
from mpdiag.record import _cpu_updates
from mpdiag.record._updates import count_update, stall_formats


def _time(fn, repeat: int) -> float:  # noqa: ANN001
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def _compare(n: int, stall: tuple[Format, ...], rounds: int) -> str:
    """One size: median ns per element of each path, and the median of their ratios by round."""
    g = torch.Generator().manual_seed(0)
    before = torch.randn(n, generator=g) * 0.05
    update = (torch.randn(n, generator=g) * 1e-4).double()
    grad = torch.randn(n, generator=g)
    moment = (torch.rand(n, generator=g) * 1e-8, 1e-16)
    repeat = 3 if n > 1_000_000 else 30

    def kernel() -> None:
        count_update(before, update, grad, stall, moment)

    def torch_path() -> None:
        available = _cpu_updates.available
        _cpu_updates.available = lambda weight: False
        try:
            count_update(before, update, grad, stall, moment)
        finally:
            _cpu_updates.available = available

    kernel(), torch_path()  # warm up
    times: dict[str, list[float]] = {"kernel": [], "torch": []}
    for _ in range(rounds):
        times["kernel"].append(_time(kernel, repeat))
        times["torch"].append(_time(torch_path, repeat))
    k, t = statistics.median(times["kernel"]), statistics.median(times["torch"])
    ratio = statistics.median(b / a for a, b in zip(times["kernel"], times["torch"]))
    per_element = f"kernel {k / n * 1e9:6.1f} ns/element, torch {t / n * 1e9:6.1f}"
    return f"{n:>11,} elements: {per_element}, torch / kernel {ratio:.1f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if not _cpu_updates.usable(torch.ones(1)):
        raise SystemExit("numba is not installed or MPDIAG_NUMBA=0: there is no kernel to compare")
    _cpu_updates.finish_compiling()
    stall = stall_formats(torch.float32, ("fp16", "bf16"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; formats fp16, bf16")
    for n in (100_000, 11_000_000):
        print(_compare(n, stall, args.rounds))


if __name__ == "__main__":
    main()
