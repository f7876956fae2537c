"""The demo: train the built-in transformer on synthetic data with diagnose attached, into a run file.

The default run shows a healthy model. ``unstable=True`` scales the embeddings up (activations past
fp16's max), the last block's output projection up (as T5's ``wo``: under fp16 autocast its output
overflows) and the loss down (gradients below fp16's smallest subnormal), so there is something to see;
``unstable_sensitivity`` measures which of its layers must stay in fp32.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import mpdiag
from mpdiag.core.comparison import Comparison
from mpdiag.core.errors import MpdiagError
from mpdiag.core.sensitivity import Sensitivity
from mpdiag.record.environment import check_autocast
from mpdiag.toy import TinyTransformerLM, lm_loss, synthetic_batches

__all__ = ["run_demo", "unstable_sensitivity", "compare_demo", "DTYPES"]

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_demo(
    out_dir: Path,
    steps: int = 40,
    dtype: str = "fp32",
    device: str = "cpu",
    unstable: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
) -> Path:
    """Train ``steps`` steps; return the path of the run file written into ``out_dir``."""
    if dtype not in DTYPES:
        raise MpdiagError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise MpdiagError("--device cuda was asked for, but this torch sees no CUDA GPU; use --device cpu")
    autocast_dtype = DTYPES[dtype]
    if autocast_dtype is not None:
        check_autocast(device, autocast_dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "run.mpdiag"
    if path.exists():
        path.unlink()
    model = demo_model(device, unstable)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = _grad_scaler(device) if dtype == "fp16" and not unstable else None
    loss_factor = 1e-9 if unstable else 1.0  # gradients below fp16's subnormals without loss scaling
    batches = synthetic_batches(device=device)
    with mpdiag.diagnose(model, optimizer=opt, scaler=scaler, run_file=path):
        for step in range(steps):
            tokens, targets = next(batches)
            opt.zero_grad()
            context = torch.autocast(device, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
            with context:
                loss = lm_loss(model(tokens), targets) * loss_factor
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            if progress is not None:
                progress(step + 1, steps, float(loss.detach()) / loss_factor)
    return path


def demo_model(device: str = "cpu", unstable: bool = False) -> TinyTransformerLM:
    """The demo's model, from seed 0; ``unstable``: with the two layers scaled past fp16's range."""
    torch.manual_seed(0)
    model = TinyTransformerLM().to(device)
    if unstable:
        with torch.no_grad():
            # The residual stream past fp16's max (65504): autocast keeps it in fp32, the statistics flag it.
            model.tok.weight.mul_(3e5)
            # A projection whose own output passes fp16's max, as T5's wo: under fp16 autocast it is inf.
            model.get_parameter(f"blocks.{len(model.blocks) - 1}.mlp.2.weight").mul_(1e5)
    return model


def unstable_sensitivity(device: str = "cpu") -> Sensitivity:
    """The unstable demo model's precision sensitivity in fp16 on one batch, with the keep-fp32 answer
    (``sens.answers``) found."""
    check_autocast(device, torch.float16)
    model = demo_model(device, unstable=True)
    tokens, targets = next(synthetic_batches(device=device))
    sens = mpdiag.sensitivity(model, lambda m, b: lm_loss(m(b[0]), b[1]), (tokens, targets), torch.float16)
    sens.keep_fp32()
    return sens


def compare_demo(
    steps: int = 40,
    device: str = "cpu",
    precisions: Sequence[str] = ("fp32", "tf32", "bf16", "fp16"),
    progress: Callable[[str, int, int, float], None] | None = None,
) -> Comparison:
    """The demo's model and data trained in each of ``precisions`` with ``mpdiag.compare``."""
    if device == "cuda" and not torch.cuda.is_available():
        raise MpdiagError("--device cuda was asked for, but this torch sees no CUDA GPU; use --device cpu")
    model = demo_model(device)
    batches = itertools.islice(synthetic_batches(device=device), steps)
    return mpdiag.compare(
        model,
        lambda m, batch: lm_loss(m(batch[0]), batch[1]),
        batches,
        make_optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        precisions=precisions,
        steps=steps,
        progress=progress,
    )


def _grad_scaler(device: str) -> torch.amp.GradScaler:
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(device)
    if device == "cuda":
        return torch.cuda.amp.GradScaler()
    raise MpdiagError("a CPU GradScaler needs torch >= 2.3; use --dtype bf16 (which needs no loss scaling)")
