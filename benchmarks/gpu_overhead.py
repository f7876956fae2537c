"""Overhead of diagnose() on a GPT-2-small training step on a CUDA GPU, and what one observation launches.

The model is transformers' GPT2LMHeadModel built from GPT2Config's defaults (no download): 12 layers,
n_embd 768, 12 heads, GPT-2's 50257-token vocabulary; batch 8 x 512 tokens; forward and the loss (computed
inside the model) under torch.autocast("cuda", dtype=torch.bfloat16); AdamW (fused where torch has it).

Variants, run in interleaved rounds so that machine noise hits them alike; the clock is read after
torch.cuda.synchronize(), so each step's queued GPU work counts; ratios are medians over rounds of
variant time / plain time in the same round:
  plain            the training step alone
  mpdiag every=1   diagnose() recording every step
  mpdiag every=10  diagnose() recording one step in ten
  amax hooks       the cheapest useful observer: one abs().amax() per floating tensor in each module output
                   and per gradient of one (parameters and their gradients are not observed)
then "every=1 / amax hooks" (the median over rounds of the two times in the same round: the figure the
overhead goal is stated in), what each observer reads per step, and the CUDA kernels one profiled step
of each variant launches.

Kernels per observed tensor: torch.profiler (CUDA activity only) around one call of mpdiag's
``_accumulate.measure`` on a ~1M-element CUDA tensor (bf16 and fp32), after a warm-up call (allocator,
Triton compilation), and around one ``x.abs().amax()`` for comparison. Kernels are the device events other
than memcpy and memset, which are counted apart; every name is printed.

Needs a CUDA GPU; exits with a message otherwise (benchmarks/overhead.py measures on CPU).

Run: python benchmarks/gpu_overhead.py [--rounds 5] [--steps 10] [--batch 8] [--seq 512] [--layers 12]
         [--vocab 50257] [--numel 1048576] [--max-seconds 150]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import time
from collections.abc import Callable, Iterable

import torch
from _observers import floor_variants, observed_per_step
from _timing import interleaved_rounds, print_times, whole_cycles
from torch import nn

import mpdiag
from mpdiag.record import _accumulate

FORMATS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")  # diagnose()'s default formats
_TRANSFERS = ("Memcpy", "Memset")  # how the profiler names device events that are not kernels


# -- the workload -----------------------------------------------------------------------------------
def build_gpt2(layers: int, seq: int, vocab: int, device: torch.device) -> nn.Module:
    """GPT-2 small (GPT2Config's defaults) with ``layers`` blocks, in fp32 on ``device``, in train mode."""
    import transformers  # here, not at the top: the no-GPU exit need not pay for importing it

    transformers.logging.set_verbosity_error()  # config notes (loss_type, token ids) are not results
    config = transformers.GPT2Config(
        n_layer=layers,
        n_positions=max(1024, seq),  # GPT-2's 1024 unless --seq asks for more
        vocab_size=vocab,
        bos_token_id=min(50256, vocab - 1),  # GPT-2's special token is its last id; keep it in a smaller --vocab
        eos_token_id=min(50256, vocab - 1),
    )
    model = transformers.GPT2LMHeadModel(config).to(device)
    model.train()
    return model


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW, fused (one launch for all parameters) where this torch and device have it: an unfused
    AdamW's many small launches would make the plain step, and so every ratio, look other than it is."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError, ValueError):  # torch without fused AdamW, or not for this device
        return torch.optim.AdamW(model.parameters(), lr=1e-4)


def make_step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> Callable[[], None]:
    """One training step: forward and loss under bf16 autocast, backward and the optimizer step outside it."""
    device_type = ids.device.type

    def step() -> None:
        opt.zero_grad()
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()

    return step


def cuda_clock() -> float:
    """perf_counter once the GPU has finished what was queued: otherwise a step's time is its launches'."""
    torch.cuda.synchronize()
    return time.perf_counter()


def timed_rounds(
    variants: dict[str, tuple[Callable[[], None], Callable[[], contextlib.AbstractContextManager[object]]]],
    rounds: int,
    steps: int,
    max_seconds: float,
) -> dict[str, list[float]]:
    """``interleaved_rounds`` one round at a time, stopping before a round that would end past ``max_seconds``
    (at least one round runs): a slower GPU gets fewer rounds rather than a run that goes on and on."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    started = time.perf_counter()
    for done in range(rounds):
        elapsed = time.perf_counter() - started
        if done and elapsed / done * (done + 1) > max_seconds:
            print(f"(stopped after {done} of {rounds} rounds: --max-seconds {max_seconds:g})")
            break
        for name, ts in interleaved_rounds(variants, 1, whole_cycles(variants, steps), clock=cuda_clock).items():
            times[name].extend(ts)
    return times


# -- what the device runs ---------------------------------------------------------------------------
def split_device_events(events: Iterable[tuple[str, str | None]]) -> tuple[list[str], list[str]]:
    """The kernels, and the memcpy/memset operations, among the (name, activity type) of device events.
    The activity type (kineto's: "kernel", "gpu_memcpy", "gpu_memset", ...; None on an older torch) is read
    only to drop ranges annotated on the GPU timeline, which run nothing; memcpy and memset also tell by
    their names, which start so."""
    kernels, transfers = [], []
    for name, activity in events:
        activity = (activity or "").lower()
        if "annotation" in activity:
            continue
        if name.startswith(_TRANSFERS) or "memcpy" in activity or "memset" in activity:
            transfers.append(name)
        else:
            kernels.append(name)
    return kernels, transfers


def device_events(fn: Callable[[], object]) -> list[tuple[str, str | None]]:
    """(name, activity type) of the CUDA device events (kernels, memcpy, memset) one call of ``fn`` runs,
    in order; after one unprofiled call, so that lazy initialisation and compilation are not counted."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA), key=_start)
    return [(e.name, getattr(e, "activity_type", None)) for e in events]


def _start(event: object) -> float:
    interval = getattr(event, "time_range", None)
    return interval.start if interval is not None else 0.0


def print_launches(label: str, fn: Callable[[], object], names: bool = True) -> int:
    """Profile one call of ``fn``, print its kernel count (and each kernel's name); returns the count."""
    kernels, transfers = split_device_events(device_events(fn))
    print(f"{label}: {len(kernels)} kernels, {len(transfers)} memcpy/memset")
    if names:
        for name, n in collections.Counter(kernels + transfers).items():
            print(f"    {n:3d} x {_short(name)}")
    return len(kernels)


def _short(name: str, width: int = 110) -> str:
    # C++ kernel names run to hundreds of characters of template arguments; the head tells them apart
    return name if len(name) <= width else name[: width - 3] + "..."


def triton_path(x: torch.Tensor) -> str:
    """Whether mpdiag measures ``x`` with its Triton kernel, as far as this version of mpdiag tells."""
    use_triton_kernel = getattr(_accumulate, "use_triton_kernel", None)
    if use_triton_kernel is None:
        return "unknown (this mpdiag has no _accumulate.use_triton_kernel)"
    try:
        return "yes" if use_triton_kernel(x) else "no"
    except Exception as e:  # noqa: BLE001 - a changed signature is a fact to print, not a reason to stop
        return f"unknown (use_triton_kernel(x) raised {type(e).__name__}: {e})"


def per_tensor_launches(numel: int, device: torch.device) -> None:
    """Kernels one observation launches: mpdiag's measure() on bf16 and fp32 tensors, and one amax."""
    print(f"\nkernels launched per observed tensor ({numel:,} elements, formats {', '.join(FORMATS)}):")
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(numel, device=device).to(dtype)
        tag = str(dtype).replace("torch.", "")
        print(f"  mpdiag Triton path for {tag}: {triton_path(x)}")
        print_launches(f"  measure() {tag}", lambda x=x: _accumulate.measure(x, FORMATS))
        print_launches(f"  abs().amax() {tag}", lambda x=x: x.abs().amax())


def per_step_launches(
    step: Callable[[], None], variants: dict[str, Callable[[], contextlib.AbstractContextManager[object]]]
) -> None:
    """Kernels one training step launches under each variant (the second step in a fresh context: the
    first builds a diagnosis's accumulators)."""
    print("\nkernels launched per training step:")
    for name, make in variants.items():
        with make():
            step()
            print_launches(f"  {name:>16}", step, names=False)


# -- the run ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257, help="GPT-2's by default")
    parser.add_argument("--numel", type=int, default=1 << 20, help="elements of the tensor measure() is profiled on")
    parser.add_argument("--max-seconds", type=float, default=150, help="no timed round starts that would end later")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(
            "gpu_overhead.py needs a CUDA GPU: torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}). benchmarks/overhead.py measures the CPU overhead."
        )
    started = time.perf_counter()
    device = torch.device("cuda")
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(device)}, "
        f"mpdiag {mpdiag.__version__}"
    )

    torch.manual_seed(0)
    model = build_gpt2(args.layers, args.seq, args.vocab, device)
    opt = make_optimizer(model)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    step = make_step(model, opt, ids)
    for _ in range(3):
        step()  # warm up: the allocator, cuBLAS/cuDNN heuristics, the fused optimizer
    observed = observed_per_step(model, opt, step)  # also compiles mpdiag's kernels before the timing
    variants = floor_variants(model, opt)
    times = timed_rounds({v: (step, make) for v, make in variants.items()}, args.rounds, args.steps, args.max_seconds)

    fused = "fused" if opt.defaults.get("fused") else "unfused"
    print(
        f"\nGPT2LMHeadModel layers={args.layers}, n_embd {model.config.n_embd}, vocab {args.vocab}, "
        f"batch {args.batch}x{args.seq}, "
        f"bf16 autocast, AdamW ({fused}); {len(times['plain'])} rounds x {args.steps} steps"
    )
    print_times(times, observed)
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")

    per_step_launches(step, variants)
    per_tensor_launches(args.numel, device)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
