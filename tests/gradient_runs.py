"""Runs recorded from gradients a test sets exactly (no loss, no backward): what advise() and the verdicts
are given when a test needs to know every gradient value."""

from __future__ import annotations

import torch
from torch import nn

import mpdiag


def record_sites(per_site: dict[str, torch.Tensor], scale: float = 1.0) -> mpdiag.Run:
    """One step, one parameter per entry with exactly that gradient (times a GradScaler's ``scale``)."""
    holder = nn.Module()
    for name, g in per_site.items():
        holder.register_parameter(name, nn.Parameter(torch.zeros_like(g)))
    with mpdiag.diagnose(holder) as diag:
        for name, g in per_site.items():
            getattr(holder, name).grad = g * scale
        diag.step()
    if scale != 1.0:
        return mpdiag.Run(diag.run.formats, diag.run.records, loss_scales={0: scale})
    return diag.run
