"""Size of a run file: the built-in transformer with about 100 modules, recorded every step.

Run: python benchmarks/runfile_size.py [--steps 1000] [--layers 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import mpdiag
from mpdiag.toy import TinyTransformerLM, lm_loss, synthetic_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = TinyTransformerLM(vocab_size=64, d_model=32, n_heads=2, n_layers=args.layers, seq_len=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = synthetic_batches(batch_size=4, seq_len=16, vocab_size=64)
    path = Path(tempfile.mkdtemp()) / "run.mpdiag"
    start = time.perf_counter()
    with mpdiag.diagnose(model, optimizer=opt, run_file=path) as diag:
        for _ in range(args.steps):
            tokens, targets = next(batches)
            opt.zero_grad()
            lm_loss(model(tokens), targets).backward()
            opt.step()
    elapsed = time.perf_counter() - start
    run = mpdiag.load(path)
    size = path.stat().st_size
    rows = sum(len(r) for r in run.records.values())
    print(
        f"{sum(1 for _ in model.modules())} modules, {len(run.sites)} sites, {len(run.steps)} steps "
        f"({elapsed:.1f} s): {size / 1e6:.1f} MB, {size / rows:.0f} bytes per site and step"
    )
    assert diag.run.steps == run.steps


if __name__ == "__main__":
    main()
