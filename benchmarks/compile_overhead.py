"""What diagnose() costs a torch.compile'd training step, side by side with eager, in one process.

Variants, run in interleaved rounds so that machine noise hits them alike (ratios are medians over
rounds of variant time / the reference's time in the same round):
  eager                     the training step, not compiled
  eager + mpdiag            diagnose() every=1 on the eager model
  compiled                  torch.compile(model) (the reference of the compiled rows)
  compiled + mpdiag         diagnose() every=1 on the compiled model
  compiled + mpdiag every=10
It also prints the graph breaks and compile time of the compiled model with and without mpdiag attached
(hook bodies are kept out of dynamo's tracing: each hooked module's call is a graph break).

Run: python benchmarks/compile_overhead.py [--model toy|gpt2] [--backend inductor] [--rounds N] [--steps N]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from _timing import Variant, interleaved_rounds

import mpdiag
from mpdiag.record import _cpu_kernel
from mpdiag.toy import TinyTransformerLM, lm_loss, synthetic_batches


def _toy(args: argparse.Namespace) -> tuple[torch.nn.Module, Callable[[torch.nn.Module], torch.Tensor]]:
    model = TinyTransformerLM(d_model=args.d_model, n_layers=args.layers, seq_len=args.seq)
    tokens, targets = next(synthetic_batches(batch_size=args.batch, seq_len=args.seq))
    return model, lambda m: lm_loss(m(tokens), targets)


def _gpt2(args: argparse.Namespace) -> tuple[torch.nn.Module, Callable[[torch.nn.Module], torch.Tensor]]:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        n_layer=args.layers,
        n_embd=args.d_model,
        n_head=4,
        vocab_size=1000,
        n_positions=args.seq,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 1000, (args.batch, args.seq))
    return model, lambda m: m(input_ids=ids, labels=ids).loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("toy", "gpt2"), default="toy")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, loss_of = (_toy if args.model == "toy" else _gpt2)(args)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compiled = torch.compile(model, backend=args.backend)

    def stepper(m: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad()
            loss_of(m).backward()
            opt.step()

        return step

    plain_step, compiled_step = stepper(model), stepper(compiled)
    breaks_plain, seconds_plain = _compile_cost(compiled_step)
    with mpdiag.diagnose(model, optimizer=opt):
        breaks_diag, seconds_diag = _compile_cost(compiled_step)
        for _ in range(10):
            compiled_step()  # the every=10 variant's unrecorded steps: nothing new to compile
    variants: dict[str, Variant] = {
        "eager": (plain_step, contextlib.nullcontext),
        "eager + mpdiag": (plain_step, lambda: mpdiag.diagnose(model, optimizer=opt)),
        "compiled": (compiled_step, contextlib.nullcontext),
        "compiled + mpdiag": (compiled_step, lambda: mpdiag.diagnose(model, optimizer=opt)),
        "compiled + mpdiag every=10": (compiled_step, lambda: mpdiag.diagnose(model, optimizer=opt, every=10)),
    }
    times = interleaved_rounds(variants, args.rounds, args.steps)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, numba kernel "
        f"{'on' if _cpu_kernel.available() else 'off'}, backend {args.backend}; model {args.model} "
        f"d_model={args.d_model} layers={args.layers} batch {args.batch}x{args.seq}; "
        f"{args.rounds} rounds x {args.steps} steps"
    )
    print(
        f"graph breaks: {breaks_plain} compiled, {breaks_diag} compiled with mpdiag attached; first compiled "
        f"step: {seconds_plain:.1f} s, {seconds_diag:.1f} s with mpdiag"
    )
    for name, ts in times.items():
        reference = times["compiled" if name.startswith("compiled") else "eager"]
        ratio = statistics.median(t / r for t, r in zip(ts, reference))
        vs_eager = statistics.median(t / r for t, r in zip(ts, times["eager"]))
        print(
            f"{name:>27}: {statistics.median(ts) * 1e3:7.1f} ms/step   {ratio:5.2f}x "
            f"{'compiled' if name.startswith('compiled') else 'eager':8}  {vs_eager:5.2f}x eager"
        )


def _compile_cost(step: Callable[[], None]) -> tuple[int, float]:
    """Graph breaks and seconds of the first step after a reset (dynamo compiles it from scratch)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
    return sum(torch._dynamo.utils.counters["graph_break"].values()), seconds


if __name__ == "__main__":
    main()
