"""The cost of combining statistics across ranks: a 2-process gloo DDP run of the built-in transformer.

Each recorded step ends with four collectives (site fingerprint, SUM of counts, MAX of extremes, NaN/inf
events). This times them on every rank, side by side with the whole diagnosed training step, and
prints medians (rank 0's, and the slower rank's).

Run: python benchmarks/distributed_overhead.py [--steps 30] [--layers 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import time
from datetime import timedelta

import torch

import mpdiag
from mpdiag.record import distributed
from mpdiag.toy import TinyTransformerLM, lm_loss, synthetic_batches


def worker(rank: int, port: int, steps: int, layers: int, queue: multiprocessing.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on a 2-core machine: one core each
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    collective: list[float] = []
    for name in ("reduce_accumulators", "gather_events"):
        original = getattr(distributed, name)

        def timed(*args, _original=original, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                collective.append(time.perf_counter() - start)

        setattr(distributed, name, timed)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(TinyTransformerLM(n_layers=layers))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = synthetic_batches(seed=rank)
    step_times = []
    with mpdiag.diagnose(model, optimizer=opt) as diag:
        for _ in range(steps):
            start = time.perf_counter()
            tokens, targets = next(batches)
            opt.zero_grad()
            lm_loss(model(tokens), targets).backward()
            opt.step()  # closes the previous step: the collectives run here
            step_times.append(time.perf_counter() - start)
        sites = len(diag.run.sites)
    per_step = [a + b for a, b in zip(collective[0::2], collective[1::2])]
    queue.put((rank, sites, per_step[2:], step_times[2:]))  # the first steps warm up
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [context.Process(target=worker, args=(r, port, args.steps, args.layers, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    for rank, sites, collective, steps in results:
        print(
            f"rank {rank}: {sites} sites; collectives {1e3 * statistics.median(collective):.1f} ms per recorded "
            f"step (median of {len(collective)}), whole diagnosed step {1e3 * statistics.median(steps):.1f} ms "
            f"({statistics.median(collective) / statistics.median(steps):.1%})"
        )


if __name__ == "__main__":
    main()
