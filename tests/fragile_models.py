"""Models with one known fragile layer, shared by the sensitivity tests on CPU and on CUDA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OverflowingBlock", "Classifier", "classification_loss", "batch"]


class OverflowingBlock(nn.Module):
    """A T5-style feed-forward block whose output projection ``wo`` reaches ~1e5, past fp16's 65,504,
    with a LayerNorm after it (which would bring the values back, were they finite)."""

    def __init__(self) -> None:
        super().__init__()
        self.wi = nn.Linear(64, 256)
        self.act = nn.ReLU()
        self.wo = nn.Linear(256, 64)
        self.norm = nn.LayerNorm(64)
        with torch.no_grad():
            self.wo.weight.mul_(200_000.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.wo(self.act(self.wi(x))))


class Classifier(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.block = block
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.inp(x)))


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(16, 32), torch.randint(0, 10, (16,))
