"""What the first use of the CPU kernel costs in a fresh environment: numba compiling it, then the cache.

For fp32 training and for bf16-autocast training (fp32 parameters and bf16 activations: two source
widths), the same child process runs twice with one empty cache directory (``MPDIAG_CACHE_DIR``): the
first compiles the kernels, the second loads them. Each child trains mpdiag's toy transformer for two
steps under diagnose() and reports the seconds each step took and the child's wall time, which includes
the wait at exit for a threaded kernel still compiling in the background.

Run: python benchmarks/first_use.py (from outside the checkout with PYTHONPATH=<another checkout> to compare two)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

CHILD = textwrap.dedent("""
    import json, sys, time
    import torch, mpdiag
    from mpdiag.toy import TinyTransformerLM, lm_loss, synthetic_batches

    model = TinyTransformerLM(d_model=128, n_layers=2, seq_len=64)
    opt = torch.optim.AdamW(model.parameters())
    tokens, targets = next(synthetic_batches(batch_size=16, seq_len=64))
    steps = {}
    with mpdiag.diagnose(model, optimizer=opt):
        for name in ("step 1", "step 2"):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=sys.argv[1] == "bf16"):
                loss = lm_loss(model(tokens), targets)
            loss.backward()
            opt.step()
            opt.zero_grad()
            steps[name] = time.perf_counter() - start
    print(json.dumps(steps))
""")


def run_child(cache: str, precision: str) -> dict[str, float]:
    env = {**os.environ, "MPDIAG_CACHE_DIR": cache, "MPDIAG_NUMBA": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, precision], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the child process failed:\n{done.stderr}")
    return {**json.loads(done.stdout.splitlines()[-1]), "process wall": wall}


def main() -> None:
    for precision, title in (("fp32", "fp32 training"), ("bf16", "bf16 autocast training")):
        with tempfile.TemporaryDirectory() as cache:
            fresh, cached = run_child(cache, precision), run_child(cache, precision)
        print(f"{title:>24} {'fresh cache':>12} {'cached':>8}   (seconds)")
        for name in fresh:
            print(f"{name:>24} {fresh[name]:12.2f} {cached[name]:8.2f}")


if __name__ == "__main__":
    main()
