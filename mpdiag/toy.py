"""A small transformer language model and synthetic data, for the demo, the benchmark and the tests.

The data is a random Markov chain over tokens, so the loss has somewhere to go (entropy of the chain)
and training curves look like real ones, without downloading anything.

Examples:
    >>> import torch
    >>> from mpdiag.toy import TinyTransformerLM, synthetic_batches
    >>> model = TinyTransformerLM(vocab_size=64, d_model=32, n_heads=2, n_layers=1, seq_len=16)
    >>> tokens, targets = next(synthetic_batches(batch_size=2, seq_len=16, vocab_size=64, seed=0))
    >>> model(tokens).shape
    torch.Size([2, 16, 64])
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyTransformerLM", "synthetic_batches", "lm_loss"]


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyTransformerLM(nn.Module):
    """A pre-norm GPT-style decoder: token and position embeddings, ``n_layers`` blocks, a linear head."""

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 128,
        n_heads: int = 4,
        n_layers: int = 2,
        seq_len: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def synthetic_batches(
    batch_size: int = 16,
    seq_len: int = 64,
    vocab_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
    branching: int = 4,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (tokens, next tokens) batches from a random Markov chain with ``branching`` successors per token."""
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(vocab_size, (vocab_size, branching), generator=gen)
    while True:
        seqs = torch.empty(batch_size, seq_len + 1, dtype=torch.long)
        seqs[:, 0] = torch.randint(vocab_size, (batch_size,), generator=gen)
        choices = torch.randint(branching, (batch_size, seq_len), generator=gen)
        for i in range(seq_len):
            seqs[:, i + 1] = successors[seqs[:, i], choices[:, i]]
        yield seqs[:, :-1].to(device), seqs[:, 1:].to(device)
