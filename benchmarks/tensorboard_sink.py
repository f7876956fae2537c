"""What watching a training in TensorBoard costs: the built-in transformer (about 100 modules) recorded
every step, with and without the TensorBoard sink, and the run file beside it.

Variants, in interleaved rounds (ratios are medians over rounds of variant time / mpdiag time in the same
round, so they say what the sink adds to a recording step):
  mpdiag            diagnose() every=1, no sink
  + tensorboard     the same with mpdiag.sinks.TensorBoard
  + run file        the same with run_file= (for comparison: the other sink mpdiag ships)

Run: python benchmarks/tensorboard_sink.py [--rounds N] [--steps N] [--layers N]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from _timing import interleaved_rounds

import mpdiag
from mpdiag.toy import TinyTransformerLM, lm_loss, synthetic_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = TinyTransformerLM(vocab_size=64, d_model=64, n_heads=2, n_layers=args.layers, seq_len=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = synthetic_batches(batch_size=8, seq_len=32, vocab_size=64)
    scratch = Path(tempfile.mkdtemp())
    made = iter(range(10**6))

    def step() -> None:
        tokens, targets = next(batches)
        opt.zero_grad()
        lm_loss(model(tokens), targets).backward()
        opt.step()

    def attached(sink: Callable[[], dict]) -> Callable[[], contextlib.AbstractContextManager[object]]:
        @contextlib.contextmanager
        def context() -> Iterator[None]:
            with mpdiag.diagnose(model, optimizer=opt, **sink()):
                yield

        return context

    variants = {
        "mpdiag": (step, attached(lambda: {})),
        "+ tensorboard": (step, attached(lambda: {"sinks": [mpdiag.sinks.TensorBoard(scratch / f"tb{next(made)}")]})),
        "+ run file": (step, attached(lambda: {"run_file": scratch / f"run{next(made)}.mpdiag"})),
    }
    times = interleaved_rounds(variants, args.rounds, args.steps)
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        step()
    sites = len(diag.run.sites)
    base = times["mpdiag"]
    print(f"{sites} sites, {args.rounds} rounds of {args.steps} steps; median seconds per step and ratio to mpdiag")
    for name, values in times.items():
        ratio = statistics.median(v / b for v, b in zip(values, base))
        extra = statistics.median(v - b for v, b in zip(values, base))
        print(f"  {name:14} {statistics.median(values) * 1e3:8.2f} ms  x{ratio:.3f}  ({extra * 1e3:+.2f} ms per step)")


if __name__ == "__main__":
    main()
