"""Counting the host reads (device-to-host syncs) that torch operators make, for the tests that recording
makes none before a step closes."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountHostReads(TorchDispatchMode):
    """Inside, ``reads`` counts every read of a tensor's value by the host (``.item()``, ``bool(t)``...)
    and ``ops`` names every operator that ran."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))
