"""What the installed torch can do, for the tests that skip (or adapt) where it cannot."""

from __future__ import annotations

import warnings

import torch


def cpu_fp16_autocast() -> bool:
    """Whether this torch runs matmuls in fp16 under CPU autocast (older ones were bf16 only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast("cpu", dtype=torch.float16):
                return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
        except RuntimeError:  # torch 2.1: "AutocastCPU only support Bfloat16"
            return False
