"""Overhead of diagnose() on one training step of real models, side by side with others.

Models (--model, default all: each in turn, in this process, one table each):
  toy      mpdiag.toy.TinyTransformerLM, cross-entropy outside the model, AdamW
  gpt2     transformers' GPT2LMHeadModel from a GPT2Config (no download): 4 layers, n_embd 128, 4 heads,
           GPT-2's vocabulary (--vocab), batch 8 x 128 tokens, the loss computed inside the model, AdamW
  convnet  a torchvision-resnet18-style network (BasicBlocks with BatchNorm and ReLU, 4 stages of 2 blocks),
           batch 8 x 3 x 64 x 64, cross-entropy on random labels, SGD with momentum

Variants, run in interleaved rounds so that machine noise hits them alike (ratios are medians over
rounds of variant time / plain time in the same round):
  plain            the training step alone
  mpdiag every=1   diagnose() recording every step (with the optimizer's state and the updates)
  mpdiag no optim  the same with optimizer_state=False, updates=False: the model's sites only
  mpdiag every=10  diagnose() recording one step in ten
  amax hooks       the cheapest useful observer: one abs().amax() per floating tensor in each module output
                   and per gradient of one (parameters and their gradients are not observed)
  amax +params     the same, also reading what mpdiag reads beside: each parameter and its gradient
  detect_anomaly   torch.autograd.detect_anomaly() around forward and backward
With --breakdown (CPU, numba kernel on), also:
  mpdiag no kernel diagnose() every=1 with the CPU kernel's work skipped (its statistics are wrong):
                   what the hooks, the bookkeeping and the step close cost without the counting
  mpdiag bincount  diagnose() every=1 counting with the torch-only counter of _torch_counter (the kernel's
                   idea in torch ops, checked against the kernel first): what dropping numba would cost
The every=10 variant runs whole recording cycles per round (10 steps, one of them recorded), so that its
figure is the average over a long run, not the cost of the unrecorded steps alone.
Each table ends with "every=1 / amax hooks" (the median over rounds of the two times in the same round:
the figure the overhead goal is stated in), the same against "amax +params", and what each observer reads
per step; with --breakdown, then the counting time per step by tensor size (each kernel call timed in
three diagnosed steps).

Run: python benchmarks/overhead.py [--model toy|gpt2|convnet|all] [--rounds N] [--steps N] [--breakdown]
         [--batch N] [--seq N] [--d-model N] [--layers N] [--vocab N] [--image N]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Mapping

import _torch_counter
import torch
import torch.nn.functional as F
from _observers import floor_variants, observed_per_step
from _timing import interleaved_rounds, print_times, whole_cycles
from torch import nn

import mpdiag
from mpdiag.record import _accumulate, _cpu_kernel, _cpu_updates
from mpdiag.toy import TinyTransformerLM, lm_loss, synthetic_batches

MODELS = ("toy", "gpt2", "convnet")

#: Each model's settings where the command line leaves them out. Rounds and steps keep the default run
#: (all three models) near three minutes on a 2-core CPU: a GPT-2 step there is ~0.8 s, four fifths
#: of it the 50257-wide head (its matmuls, log_softmax and their backward).
DEFAULTS: dict[str, dict[str, int]] = {
    "toy": {"rounds": 7, "steps": 5, "batch": 16, "seq": 64, "d_model": 128, "layers": 2},
    "gpt2": {"rounds": 5, "steps": 2, "batch": 8, "seq": 128, "d_model": 128, "layers": 4},
    "convnet": {"rounds": 7, "steps": 5, "batch": 8},
}


@dataclasses.dataclass
class Workload:
    """One model's training step, and what the tables say about it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], None]
    description: str


# -- models -----------------------------------------------------------------------------------------
def toy_workload(settings: Mapping[str, int]) -> Workload:
    model = TinyTransformerLM(d_model=settings["d_model"], n_layers=settings["layers"], seq_len=settings["seq"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens, targets = next(synthetic_batches(batch_size=settings["batch"], seq_len=settings["seq"]))

    def step() -> None:
        opt.zero_grad()
        lm_loss(model(tokens), targets).backward()
        opt.step()

    description = (
        f"TinyTransformerLM d_model={settings['d_model']}, layers={settings['layers']}, "
        f"batch {settings['batch']}x{settings['seq']}, AdamW"
    )
    return Workload(model, opt, step, description)


def gpt2_workload(settings: Mapping[str, int]) -> Workload:
    import transformers  # here, not at the top: --model toy need not pay for importing it

    transformers.logging.set_verbosity_error()  # config notes (loss_type, token ids) are not results
    vocab = settings["vocab"]
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=settings["seq"],
        n_embd=settings["d_model"],
        n_layer=settings["layers"],
        n_head=4,
        # GPT-2's special token is its last id; keep it inside a smaller --vocab
        bos_token_id=min(50256, vocab - 1),
        eos_token_id=min(50256, vocab - 1),
    )
    model = transformers.GPT2LMHeadModel(config)
    model.train()  # from_pretrained would leave eval mode; a config-built model is in train mode already
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (settings["batch"], settings["seq"]))

    def step() -> None:
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    description = (
        f"GPT2LMHeadModel n_embd={settings['d_model']}, layers={settings['layers']}, vocab {vocab}, "
        f"batch {settings['batch']}x{settings['seq']}, AdamW"
    )
    return Workload(model, opt, step, description)


class BasicBlock(nn.Module):
    """torchvision's resnet BasicBlock: two 3x3 convolutions with BatchNorm, a shortcut, one ReLU module
    called twice (so mpdiag sees one site fed two tensors per step, as in the real model)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)  # in place, as torchvision has it: observers must see the value first
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """resnet18's layout: a 7x7 stride-2 stem and max pool, stages of 64-512 channels, average pool, linear."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, c_in = [], 64
        for i, c_out in enumerate((64, 128, 256, 512)):
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, 1 if i == 0 else 2), BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def convnet_workload(settings: Mapping[str, int]) -> Workload:
    model = ResNet18()
    # lr 0.01: the same batch every step, and at 0.1 the run could leave the finite range and time NaNs
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(settings["batch"], 3, settings["image"], settings["image"])
    labels = torch.randint(0, 1000, (settings["batch"],))

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        opt.step()

    description = f"resnet18-style convnet, batch {settings['batch']}x3x{settings['image']}x{settings['image']}, SGD"
    return Workload(model, opt, step, description)


BUILDERS: dict[str, Callable[[Mapping[str, int]], Workload]] = {
    "toy": toy_workload,
    "gpt2": gpt2_workload,
    "convnet": convnet_workload,
}


# -- measuring --------------------------------------------------------------------------------------
def variants_of(work: Workload, breakdown: bool) -> dict[str, Callable[[], contextlib.AbstractContextManager[object]]]:
    variants = floor_variants(work.model, work.optimizer)
    variants["detect_anomaly"] = lambda: torch.autograd.detect_anomaly(check_nan=True)
    if breakdown:
        every1 = variants["mpdiag every=1"]
        variants["mpdiag no kernel"] = lambda: _counting_with(_no_count, every1)
        variants["mpdiag bincount"] = lambda: _counting_with(_torch_counter.count_into, every1)
    return variants


def measure_model(name: str, settings: Mapping[str, int], breakdown: bool) -> None:
    torch.manual_seed(0)
    started = time.perf_counter()
    work = BUILDERS[name](settings)
    for _ in range(2):
        work.step()  # warm up the allocator
    observed = observed_per_step(work.model, work.optimizer, work.step)  # compiles mpdiag's kernels
    _cpu_kernel.finish_compiling()  # the threaded one compiles in the background: time the same path throughout
    _cpu_updates.finish_compiling()  # so does the update counts' kernel
    variants = variants_of(work, breakdown)
    if breakdown:
        with _counting_with(_checked_torch_counter, lambda: mpdiag.diagnose(work.model, optimizer=work.optimizer)):
            work.step()  # the torch-only counter agrees with the kernel on every tensor of a step
    with _no_anomaly_warnings():
        times = interleaved_rounds(
            {v: (work.step, make) for v, make in variants.items()},
            settings["rounds"],
            whole_cycles(variants, settings["steps"]),
        )

    print(f"\n== {name}: {work.description}; {settings['rounds']} rounds x {settings['steps']} steps")
    print_times(times, observed)
    if breakdown:
        print_counting_by_size(work)
    if not all(torch.isfinite(p).all() for p in work.model.parameters()):
        print("warning: the parameters left the finite range; the times above include NaN/inf handling")
    print(f"({time.perf_counter() - started:.0f} s)")


#: Tensor sizes (elements) the counting time is split by: the kernel's direct path, small, medium, large.
SIZE_RANGES = ((0, 8192), (8192, 1 << 16), (1 << 16, 1 << 20), (1 << 20, None))


def print_counting_by_size(work: Workload, steps: int = 3) -> None:
    """Time each CPU kernel call in ``steps`` diagnosed steps and print, per range of tensor sizes, how
    many tensors a step counts, their elements and the milliseconds spent counting them."""
    calls: list[tuple[int, float]] = []

    def timed(x: torch.Tensor, layout: object, counts: object) -> dict[str, float]:
        start = time.perf_counter()
        result = kernel(x, layout, counts)
        calls.append((x.numel(), time.perf_counter() - start))
        return result

    kernel = _cpu_kernel.count_into
    with _counting_with(timed, lambda: mpdiag.diagnose(work.model, optimizer=work.optimizer)):
        for _ in range(steps):
            work.step()
    total = sum(t for _, t in calls) / steps
    elements = sum(n for n, _ in calls) / steps
    print(
        f"counting per step: {len(calls) / steps:.0f} tensors, {elements / 1e6:.1f}M elements, {total * 1e3:.1f} ms "
        f"({total / elements * 1e9:.2f} ns per element)"
    )
    for low, high in SIZE_RANGES:
        part = [(n, t) for n, t in calls if n >= low and (high is None or n < high)]
        span = f"{low}+" if high is None else f"{low}-{high - 1}"
        print(
            f"  {span:>16} elements: {len(part) / steps:4.0f} tensors, {sum(n for n, _ in part) / steps / 1e6:6.2f}M "
            f"elements, {sum(t for _, t in part) / steps * 1e3:6.2f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=(*MODELS, "all"), default="all")
    parser.add_argument("--rounds", type=int, help="default: per model (toy 7, gpt2 5, convnet 7)")
    parser.add_argument("--steps", type=int, help="steps per variant per round; default: per model (5, 2, 5)")
    parser.add_argument("--batch", type=int, help="default: per model (16, 8, 8)")
    parser.add_argument("--seq", type=int, help="tokens per sequence, toy and gpt2 (default 64, 128)")
    parser.add_argument("--d-model", type=int, help="toy d_model and gpt2 n_embd (default 128)")
    parser.add_argument("--layers", type=int, help="toy and gpt2 blocks (default 2, 4)")
    parser.add_argument("--vocab", type=int, default=50257, help="gpt2 vocabulary (default GPT-2's)")
    parser.add_argument("--image", type=int, default=64, help="convnet image side in pixels")
    parser.add_argument("--breakdown", action="store_true", help="also time diagnose() with the kernel skipped")
    args = parser.parse_args()
    if args.breakdown and not _cpu_kernel.available():
        raise SystemExit("--breakdown needs the numba kernel: pip install 'mpdiag[fast]'")

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, numba kernel: "
        f"{'on' if _cpu_kernel.available() else 'off'}"
    )
    for name in MODELS if args.model == "all" else (args.model,):
        measure_model(name, _settings(name, args), args.breakdown)


def _settings(name: str, args: argparse.Namespace) -> dict[str, int]:
    """The model's defaults, with what the command line gave on top."""
    settings = {**DEFAULTS[name], "vocab": args.vocab, "image": args.image}
    for key in ("rounds", "steps", "batch", "seq", "d_model", "layers"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return settings


def _no_count(x: torch.Tensor, layout: object, counts: object) -> dict[str, float]:
    """A stand-in for the CPU kernel that counts nothing (the statistics it leaves are wrong)."""
    return _accumulate.DEVICE_STATS.unpack(_accumulate.DEVICE_STATS.initial)


def _checked_torch_counter(x: torch.Tensor, layout: object, counts: object) -> dict[str, float]:
    """The torch-only counter, raising where it disagrees with the kernel."""
    _torch_counter.check(x, layout)
    return _torch_counter.count_into(x, layout, counts)


@contextlib.contextmanager
def _counting_with(
    count_into: Callable[..., dict[str, float]], make: Callable[[], contextlib.AbstractContextManager[object]]
) -> Iterator[None]:
    """``make()``'s context with the CPU kernel's count_into replaced by ``count_into``."""
    real = _cpu_kernel.count_into
    _cpu_kernel.count_into = count_into
    try:
        with make():
            yield
    finally:
        _cpu_kernel.count_into = real


@contextlib.contextmanager
def _no_anomaly_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
        yield


if __name__ == "__main__":
    main()
