"""The built-in transformer and its synthetic data: they learn, deterministically."""

from __future__ import annotations

import pytest
import torch

from mpdiag.toy import TinyTransformerLM, lm_loss, synthetic_batches


def test_loss_falls_below_uniform() -> None:
    torch.manual_seed(0)
    model = TinyTransformerLM(vocab_size=32, d_model=32, n_heads=2, n_layers=1, seq_len=16, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = synthetic_batches(batch_size=16, seq_len=16, vocab_size=32, seed=1, branching=2)
    losses = []
    for _ in range(60):
        tokens, targets = next(batches)
        loss = lm_loss(model(tokens), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.0  # about log(32) = 3.47 at the start
    assert sum(losses[-5:]) / 5 < 2.0  # the chain has 2 successors per token: entropy log(2) = 0.69


def test_batches_are_deterministic_and_shaped() -> None:
    a = next(synthetic_batches(batch_size=3, seq_len=5, vocab_size=11, seed=7))
    b = next(synthetic_batches(batch_size=3, seq_len=5, vocab_size=11, seed=7))
    assert torch.equal(a[0], b[0]) and a[0].shape == (3, 5) and int(a[0].max()) < 11
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])


def test_bad_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="divisible"):
        TinyTransformerLM(d_model=30, n_heads=4)
