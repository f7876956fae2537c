"""Modules that make NaN or inf on purpose, in a known module and phase, shared by the tests of where
non-finite values come from (the recorded events, trace_nonfinite, anomaly mode, the report)."""

from __future__ import annotations

import math

import torch
from torch import nn


class Log(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.log()  # NaN for negative inputs: made here, in forward


class Sqrt(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sqrt()  # NaN for negative inputs, made here in forward


class InfGradient(torch.autograd.Function):
    """Identity forward; its backward multiplies by inf: an Inf that exists only in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf


class InfInBackward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return InfGradient.apply(x)


def sqrt_model() -> nn.Sequential:
    """Linear -> sqrt -> Linear: NaN in forward wherever the first layer's output is negative (module "1")."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), Sqrt(), nn.Linear(4, 2))
