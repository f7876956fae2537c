"""Overhead of diagnose() on one training step of the built-in transformer: plain vs diagnosed.

Rounds are interleaved (plain, every=1, every=10, plain, ...) so that machine noise hits all variants
alike; the printed ratios are medians over rounds. Run: python benchmarks/overhead.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mpdiag
from mpdiag.toy import TinyTransformerLM, lm_loss, synthetic_batches


def make_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch):
    tokens, targets = batch

    def step() -> None:
        opt.zero_grad()
        lm_loss(model(tokens), targets).backward()
        opt.step()
    return step


def time_steps(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = TinyTransformerLM(d_model=args.d_model, n_layers=args.layers, seq_len=args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = next(synthetic_batches(batch_size=args.batch, seq_len=args.seq))
    step = make_step(model, opt, batch)
    variants = {"plain": None, "every=1": 1, "every=10": 10}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(2):
        step()  # warm up allocator and kernels
    for _ in range(args.rounds):
        for name, every in variants.items():
            if every is None:
                times[name].append(time_steps(step, args.steps))
                continue
            with mpdiag.diagnose(model, every=every, optimizer=opt):
                step()  # warm-up: builds layouts and accumulators
                times[name].append(time_steps(step, args.steps))
    plain = statistics.median(times["plain"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d_model={args.d_model}, "
          f"layers={args.layers}, batch={args.batch}x{args.seq}, {args.rounds} rounds x {args.steps} steps")
    print(f"plain step: {plain * 1e3:.1f} ms (median)")
    for name in variants:
        if name != "plain":
            ratios = [t / p for t, p in zip(times[name], times["plain"])]
            print(f"{name:>9}: {statistics.median(times[name]) * 1e3:.1f} ms, ratio to plain {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
