"""Models and training loops shared by the tests: models from real libraries built from configs with
random weights (nothing is downloaded), small enough for a 2-core CPU."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import mpdiag

VOCAB, SEQ = 64, 16


def tiny_gpt2(seed: int = 0, **config: Any) -> nn.Module:
    """transformers' GPT2LMHeadModel from a config: 2 layers, width 32, in train mode (dropout on)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()  # the tiny vocabulary makes it warn about bos/eos ids
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0, **config
    )
    model = transformers.GPT2LMHeadModel(cfg)
    model.train()
    return model


def token_batches(n: int, batch: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, SEQ), generator=g) for _ in range(n)]


def lm_loss(model: nn.Module, ids: torch.Tensor, inside: bool = True) -> torch.Tensor:
    """GPT-2's loss computed inside the model (``labels=``) or outside it, by the same loss function."""
    if inside:
        return model(input_ids=ids, labels=ids).loss
    logits = model(input_ids=ids).logits
    return model.loss_function(logits, ids, vocab_size=VOCAB)


def backward_and_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """One optimizer step on ``loss``, through ``scaler`` as its documentation prescribes when there is one."""
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def train_gpt2(
    inside: bool = True,
    steps: int = 3,
    scaler: torch.amp.GradScaler | None = None,
    autocast: torch.dtype | None = None,
    prepare: Callable[[nn.Module], None] | None = None,
    **options: Any,
) -> tuple[mpdiag.Run, list[bool]]:
    """A few AdamW steps of ``tiny_gpt2`` under diagnose(); returns the run and which steps the real
    GradScaler skipped (its scale went down)."""
    model = tiny_gpt2()
    if prepare is not None:
        prepare(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    skipped = []
    torch.manual_seed(2)  # dropout masks alike from run to run
    with mpdiag.diagnose(model, optimizer=opt, scaler=scaler, **options) as diag:
        for ids in token_batches(steps):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                loss = lm_loss(model, ids, inside)
            if scaler is None:
                loss.backward()
                opt.step()
                continue
            scaler.scale(loss).backward()
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped.append(scaler.get_scale() < before)
    return diag.run, skipped


def small_convnet() -> nn.Module:
    """A torchvision-style block (conv, batch norm, ReLU, pooling, a linear head); torchvision's wheel
    does not import beside the CPU torch here."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def image_batches(n: int, batch: int = 4, seed: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 10, (batch,), generator=g)


def sites_that_differ(a: mpdiag.Run, b: mpdiag.Run) -> list[mpdiag.Site]:
    """Sites of either run whose statistics (merged over steps) are not identical in the other; an
    update site also differs where its ``update_stats`` of some step do."""
    union = list(dict.fromkeys([*a.sites, *b.sites]))
    differ = [s for s in union if s not in a.sites or s not in b.sites or a.stats(*s) != b.stats(*s)]
    steps = sorted({*a.updates, *b.updates})
    params = dict.fromkeys(n for run in (a, b) for s in steps for n in run.updates.get(s, {}))
    differ += [
        mpdiag.Site(name, mpdiag.Kind.UPDATE)
        for name in params
        if any(a.updates.get(s, {}).get(name) != b.updates.get(s, {}).get(name) for s in steps)
        and mpdiag.Site(name, mpdiag.Kind.UPDATE) not in differ
    ]
    return differ
