"""How long the HTML report takes for a large run: about 1,000 sites recorded over 100 steps.

Records the built-in transformer (small tensors, many layers) into a run file, loads it back as the CLI
would, and times mpdiag.report() on it (median of --rounds renders; the first also warms font caches).

Run: python benchmarks/report_render.py [--steps 100] [--layers 22] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import mpdiag
from mpdiag.toy import TinyTransformerLM, lm_loss, synthetic_batches


def record(path: Path, steps: int, layers: int) -> None:
    torch.manual_seed(0)
    model = TinyTransformerLM(vocab_size=64, d_model=32, n_heads=2, n_layers=layers, seq_len=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = synthetic_batches(batch_size=4, seq_len=16, vocab_size=64)
    with mpdiag.diagnose(model, optimizer=opt, run_file=path):
        for _ in range(steps):
            tokens, targets = next(batches)
            opt.zero_grad()
            lm_loss(model(tokens), targets).backward()
            opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    record(out / "run.mpdiag", args.steps, args.layers)
    recorded = time.perf_counter() - start
    start = time.perf_counter()
    run = mpdiag.load(out / "run.mpdiag")
    loaded = time.perf_counter() - start
    times = [mpdiag.report(run, out / "report").seconds for _ in range(args.rounds)]
    html = out / "report" / "report.html"
    print(f"{len(run.sites)} sites x {len(run.steps)} steps (recorded in {recorded:.1f} s, loaded in {loaded:.1f} s)")
    print(
        f"report: median {statistics.median(times):.1f} s over {args.rounds} renders "
        f"({', '.join(f'{t:.1f}' for t in times)}); report.html {html.stat().st_size / 1e6:.1f} MB"
    )


if __name__ == "__main__":
    main()
