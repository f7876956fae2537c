"""Empirical loss-scale replay: re-run one batch under autocast at several loss scales and look.

``advise`` predicts from recorded fp32 statistics what casting scaled gradients would do. A real
low-precision backward can differ: an activation gradient that underflows in fp16 zeroes every
gradient computed from it, even where the final parameter gradient would have been representable.
``replay_loss_scale`` measures it: an fp32 reference backward, then for each scale a backward of
``scale * loss`` under autocast, and per site the fraction of gradient elements that came out zero
while the reference was non-zero, and whether anything overflowed.

The model is left exactly as it was found: parameters, ``.grad``, buffers (batch-norm statistics)
and the random number generators (every run draws the same dropout masks, and the caller's random
stream continues as if nothing happened). A Diagnosis attached to the model records none of it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mpdiag.analysis.scaling import ScaleOutcome
from mpdiag.core import formats as _formats
from mpdiag.core.errors import MpdiagError
from mpdiag.core.run import Kind, Site
from mpdiag.probe._rerun import preserved
from mpdiag.record import check_autocast, floating_tensors

__all__ = ["replay_loss_scale", "ReplayResult"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class _Counts:
    nonzero: int  # finite non-zero elements in the reference gradient
    zeroed: int  # of those, elements that are zero in the replay
    subnormal: int  # of those, elements whose scaled replay gradient is subnormal in the format
    overflow: bool  # the replay gradient holds inf or NaN where the reference was finite


@dataclass(frozen=True)
class ReplayResult:
    """Measured outcome of each replayed loss scale, per gradient site and overall.

    ``at(scale, site=None)`` returns the same ``mpdiag.analysis.scaling.ScaleOutcome`` as ``advise``.
    """

    dtype: torch.dtype
    scales: tuple[float, ...]
    sites: tuple[Site, ...]
    _counts: dict[float, dict[Site, _Counts]] = field(repr=False, default_factory=dict)

    def at(self, scale: float, site: Site | tuple[str, str] | None = None) -> ScaleOutcome:
        if scale not in self._counts:
            raise MpdiagError(f"scale {scale!r} was not replayed; replayed scales: {list(self.scales)}")
        counts = self._counts[scale]
        if site is not None:
            wanted = Site(site[0], Kind.parse(site[1]))
            if wanted not in counts:
                raise MpdiagError(
                    f"no gradient site {wanted.name!r} ({wanted.kind}) in this replay; "
                    f"sites look like {list(self.sites[:3])}"
                )
            counts = {wanted: counts[wanted]}
        nonzero = sum(c.nonzero for c in counts.values())
        fractions = [(c.zeroed / c.nonzero, s.name) for s, c in counts.items() if c.zeroed]
        return ScaleOutcome(
            scale=scale,
            overflow=any(c.overflow for c in counts.values()),
            underflow=sum(c.zeroed for c in counts.values()) / nonzero if nonzero else 0.0,
            subnormal=sum(c.subnormal for c in counts.values()) / nonzero if nonzero else 0.0,
            overflow_sites=tuple(s.name for s, c in counts.items() if c.overflow),
            worst_underflow_site=max(fractions)[1] if fractions else None,
        )


def replay_loss_scale(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    scales: Sequence[float],
    *,
    dtype: torch.dtype = torch.float16,
    device_type: str | None = None,
) -> ReplayResult:
    """Measure what each loss scale does to one batch's gradients in a real autocast backward.

    Args:
        model: the model (train or eval mode, as you want the replay to run).
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss of the batch, forward included.
        batch: whatever ``loss_fn`` takes.
        scales: loss scales to replay.
        dtype: the autocast dtype (float16 or bfloat16).
        device_type: autocast device type; default the device of the model's first parameter.

    Examples:
        >>> import torch, mpdiag
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        >>> loss = lambda m, x: m(x).float().mean() * 1e-9  # gradients far below fp16's subnormals
        >>> result = mpdiag.replay_loss_scale(model, loss, torch.randn(4, 8), [1.0, 2.0**32],
        ...                                   dtype=torch.bfloat16)  # any CPU torch; fp16 needs torch >= 2.3
        >>> result.at(1.0).underflow, result.at(2.0**32).underflow  # bf16 keeps them at any scale
        (0.0, 0.0)
    """
    if not isinstance(model, nn.Module):
        raise MpdiagError(f"replay_loss_scale expects a torch.nn.Module, got {type(model).__name__}")
    if not scales or any(not s > 0 for s in scales):
        raise MpdiagError(f"expected positive loss scales, got {list(scales)!r}")
    fmt = _formats.get(dtype)
    device_type = device_type or _device_type(model)
    check_autocast(device_type, dtype)
    with preserved(model) as rerun:
        reference = rerun(lambda: _gradients(model, loss_fn, batch, 1.0, None))
        counts = {
            float(scale): _compare(
                reference,
                rerun(functools.partial(_gradients, model, loss_fn, batch, scale, (device_type, dtype))),
                fmt.min_normal,
            )
            for scale in scales
        }
    return ReplayResult(dtype, tuple(float(s) for s in scales), tuple(reference), counts)


def _gradients(
    model: nn.Module, loss_fn: LossFn, batch: Any, scale: float, autocast: tuple[str, torch.dtype] | None
) -> dict[Site, torch.Tensor]:
    """One forward and backward of ``scale * loss``; every parameter and module-output gradient."""
    grads: dict[Site, list[torch.Tensor]] = {}

    def keep(site: Site) -> Callable[[torch.Tensor], None]:
        return lambda g: grads.setdefault(site, []).append(g.detach().float().flatten().clone())

    def on_forward(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            for t in floating_tensors(output):
                if t.requires_grad:
                    t.register_hook(keep(Site(name, Kind.ACTIVATION_GRAD)))

        return hook

    handles = [m.register_forward_hook(on_forward(n)) for n, m in model.named_modules()]
    try:
        ctx = torch.autocast(autocast[0], dtype=autocast[1]) if autocast else contextlib.nullcontext()
        with ctx:
            loss = loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise MpdiagError(f"loss_fn must return a scalar loss tensor, got {type(loss).__name__}")
        (loss.float() * scale).backward()
    finally:
        for h in handles:
            h.remove()
    for name, p in model.named_parameters():
        if p.grad is not None:
            grads[Site(name, Kind.PARAM_GRAD)] = [p.grad.detach().float().flatten().clone()]
    return {site: torch.cat(parts) for site, parts in grads.items()}


def _compare(
    reference: dict[Site, torch.Tensor], replay: dict[Site, torch.Tensor], min_normal: float
) -> dict[Site, _Counts]:
    counts = {}
    for site, ref in reference.items():
        got = replay.get(site)
        live = torch.isfinite(ref) & (ref != 0)
        if got is None or got.shape != ref.shape:
            counts[site] = _Counts(int(live.sum()), int(live.sum()), 0, False)  # no gradient reached it
            continue
        # the gradient as backward left it is scale * true gradient: that is what was cast
        counts[site] = _Counts(
            nonzero=int(live.sum()),
            zeroed=int((live & (got == 0)).sum()),
            subnormal=int((live & (got != 0) & (got.abs() < min_normal)).sum()),
            overflow=bool((torch.isfinite(ref) & ~torch.isfinite(got)).any()),
        )
    return counts


def _device_type(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    return param.device.type if param is not None else "cpu"
