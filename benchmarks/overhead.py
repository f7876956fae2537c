"""Overhead of diagnose() on one training step of the built-in transformer, side by side with others.

Variants, run in interleaved rounds so that machine noise hits them alike (ratios are medians over
rounds of variant time / plain time in the same round):
  plain            the training step alone
  mpdiag every=1   diagnose() recording every step
  mpdiag every=10  diagnose() recording one step in ten
  amax hooks       the cheapest useful observer: one abs().amax() per module output and output grad
  detect_anomaly   torch.autograd.detect_anomaly() around forward and backward
With --breakdown (CPU, numba kernel on), also:
  mpdiag no kernel diagnose() every=1 with the CPU kernel's work skipped (its statistics are wrong):
                   what the hooks, the bookkeeping and the step close cost without the counting

Run: python benchmarks/overhead.py [--rounds N] [--steps N] [--d-model N] [--layers N] [--breakdown]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable, Iterator

import torch
from _timing import interleaved_rounds

import mpdiag
from mpdiag.record import _accumulate, _cpu_kernel
from mpdiag.toy import TinyTransformerLM, lm_loss, synthetic_batches


@contextlib.contextmanager
def amax_hooks(model: torch.nn.Module) -> Iterator[None]:
    """One abs().amax() per output and per output gradient, kept on the device (no host sync)."""
    kept: list[torch.Tensor] = []

    def forward_hook(module: torch.nn.Module, args: object, out: object) -> None:
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            kept.append(out.detach().abs().amax())
            if out.requires_grad:
                out.register_hook(lambda g: kept.append(g.abs().amax()) and None)

    handles = [m.register_forward_hook(forward_hook) for m in model.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--breakdown", action="store_true", help="also time diagnose() with the kernel skipped")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = TinyTransformerLM(d_model=args.d_model, n_layers=args.layers, seq_len=args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens, targets = next(synthetic_batches(batch_size=args.batch, seq_len=args.seq))

    def step() -> None:
        opt.zero_grad()
        lm_loss(model(tokens), targets).backward()
        opt.step()

    variants: dict[str, Callable[[], contextlib.AbstractContextManager[object]]] = {
        "plain": contextlib.nullcontext,
        "mpdiag every=1": lambda: mpdiag.diagnose(model, every=1, optimizer=opt),
        "mpdiag every=10": lambda: mpdiag.diagnose(model, every=10, optimizer=opt),
        "amax hooks": lambda: amax_hooks(model),
        "detect_anomaly": lambda: torch.autograd.detect_anomaly(check_nan=True),
    }
    if args.breakdown:
        if not _cpu_kernel.available():
            raise SystemExit("--breakdown needs the numba kernel: pip install 'mpdiag[fast]'")
        variants["mpdiag no kernel"] = lambda: _without_kernel(lambda: mpdiag.diagnose(model, every=1, optimizer=opt))
    for _ in range(2):
        step()  # warm up the allocator, and compile mpdiag's kernels
    with mpdiag.diagnose(model, optimizer=opt):
        step()
    with _no_anomaly_warnings():
        times = interleaved_rounds({name: (step, make) for name, make in variants.items()}, args.rounds, args.steps)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, numba kernel: "
        f"{'on' if _cpu_kernel.available() else 'off'}; d_model={args.d_model}, layers={args.layers}, "
        f"batch {args.batch}x{args.seq}; {args.rounds} rounds x {args.steps} steps"
    )
    plain = times["plain"]
    for name, ts in times.items():
        ratio = statistics.median(t / p for t, p in zip(ts, plain))
        print(f"{name:>16}: {statistics.median(ts) * 1e3:7.1f} ms/step   {ratio:5.2f}x plain")


@contextlib.contextmanager
def _without_kernel(make: Callable[[], contextlib.AbstractContextManager[object]]) -> Iterator[None]:
    """``make()``'s context with the CPU kernel replaced by a stub that counts nothing."""
    real = _cpu_kernel.count_into
    _cpu_kernel.count_into = lambda x, layout, counts: _accumulate.DEVICE_STATS.unpack(_accumulate.DEVICE_STATS.initial)
    try:
        with make():
            yield
    finally:
        _cpu_kernel.count_into = real


@contextlib.contextmanager
def _no_anomaly_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
        yield


if __name__ == "__main__":
    main()
