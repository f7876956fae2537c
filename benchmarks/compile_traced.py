"""Could recording be traced into the compiled graph instead of running between graphs? Measured.

mpdiag keeps its hook bodies out of dynamo (they run eagerly, at graph breaks). The alternative is
hooks that dynamo traces: the same bucket counts computed with traceable torch ops (bucketize against
mpdiag's own edges and a fixed-size index_add_ into buffers made before compiling), fused into the
compiled forward and backward, no graph break. Variants, interleaved rounds, medians of ratios to the
compiled step of the same round:
  compiled               torch.compile(model), nothing observing
  compiled + mpdiag      diagnose() every=1 (hook bodies untraced: graph breaks, the CPU kernel)
  compiled + traced ops  forward and output-gradient hooks traced into the graph, counting with torch ops
  compiled + amax        the cheapest traced observer: one abs().amax() per output and output gradient
Parameters and their gradients are left out of the traced variants (they are outside the compiled
region in any design), so those variants do less than mpdiag does.

Run: python benchmarks/compile_traced.py [--backend inductor] [--rounds N] [--steps N]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import warnings
from collections.abc import Callable, Iterator

import torch
from _timing import Variant, interleaved_rounds

import mpdiag
from mpdiag.core.stats import DEFAULT_FORMATS
from mpdiag.record._layout import layout_for
from mpdiag.record.hooks import floating_tensors
from mpdiag.toy import TinyTransformerLM, lm_loss, synthetic_batches


def _count_into(x: torch.Tensor, edges: torch.Tensor, counts: torch.Tensor, ext: torch.Tensor) -> None:
    """mpdiag's torch-ops measurement, written so that dynamo traces it: shapes known in advance."""
    x = x.detach().float()
    buckets = torch.bucketize(x.reshape(-1), edges)
    counts.index_add_(0, buckets, torch.ones_like(buckets))
    magnitude = torch.nan_to_num(x.abs(), nan=0.0, posinf=0.0)
    ext[0] = torch.maximum(ext[0], magnitude.amax().double())
    ext[1] = torch.maximum(ext[1], -torch.where(magnitude > 0, magnitude, torch.inf).amin().double())


@contextlib.contextmanager
def traced_hooks(model: torch.nn.Module, observe: Callable[[torch.Tensor, int], None]) -> Iterator[None]:
    """Forward hooks (and output-gradient hooks) that dynamo traces; ``observe(tensor, site index)``."""
    handles = []
    for index, (_, module) in enumerate(model.named_modules()):

        def forward_hook(module: torch.nn.Module, args: object, out: object, index: int = index) -> None:
            for t in floating_tensors(out):
                if t.dim() == 0:
                    continue
                observe(t, 2 * index)
                if t.requires_grad:
                    t.register_hook(lambda g, index=index: observe(g, 2 * index + 1))

        handles.append(module.register_forward_hook(forward_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()

    # Every variant's graphs live side by side: dynamo must guard on the hooks to pick the right one (by
    # default it does not, and a variant would silently run another's graph), and keep more of them.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    torch._dynamo.config.cache_size_limit = 64
    torch.manual_seed(0)
    model = TinyTransformerLM(d_model=args.d_model, n_layers=args.layers, seq_len=args.seq)
    tokens, targets = next(synthetic_batches(batch_size=args.batch, seq_len=args.seq))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n_sites = 2 * len(list(model.modules()))
    layout = layout_for(torch.float32, DEFAULT_FORMATS)
    edges = layout.edges_on(torch.device("cpu"))
    # A buffer of its own per site: views of one tensor would tie the forward's updates to the backward's.
    counts = [torch.zeros(layout.n_buckets, dtype=torch.int64) for _ in range(n_sites)]
    ext = [torch.full((2,), -torch.inf, dtype=torch.float64) for _ in range(n_sites)]
    peaks = [torch.zeros(()) for _ in range(n_sites)]

    def count(t: torch.Tensor, site: int) -> None:
        _count_into(t, edges, counts[site], ext[site])

    def amax(t: torch.Tensor, site: int) -> None:
        torch.maximum(peaks[site], t.detach().abs().amax().float(), out=peaks[site])

    def fresh_compile(make: Callable[[], contextlib.AbstractContextManager[object]]) -> Variant:
        """A step of its own compiled copy: the observers are traced in, so each needs its own graph."""
        compiled = torch.compile(model, backend=args.backend)

        def step() -> None:
            opt.zero_grad()
            lm_loss(compiled(tokens), targets).backward()
            opt.step()

        return step, make

    variants = {
        "compiled": fresh_compile(contextlib.nullcontext),
        "compiled + mpdiag": fresh_compile(lambda: mpdiag.diagnose(model, optimizer=opt)),
        "compiled + traced ops": fresh_compile(lambda: traced_hooks(model, count)),
        "compiled + amax": fresh_compile(lambda: traced_hooks(model, amax)),
    }
    breaks = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (step, make) in variants.items():
            torch._dynamo.reset()  # one variant's graphs at a time: hooks are guarded per module
            torch._dynamo.utils.counters.clear()
            with make():
                step()
            breaks[name] = sum(torch._dynamo.utils.counters["graph_break"].values())
        times = interleaved_rounds(variants, args.rounds, args.steps)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {args.backend}; toy transformer "
        f"d_model={args.d_model} layers={args.layers} batch {args.batch}x{args.seq}; "
        f"{args.rounds} rounds x {args.steps} steps"
    )
    for name, ts in times.items():
        ratio = statistics.median(t / c for t, c in zip(ts, times["compiled"]))
        print(
            f"{name:>22}: {statistics.median(ts) * 1e3:7.1f} ms/step  {ratio:5.2f}x compiled  "
            f"graph breaks {breaks[name]}"
        )


if __name__ == "__main__":
    main()
