"""Counting what an optimizer step did to each parameter, on the parameter's device, with no host sync.

``count_update`` packs one parameter's counts (see ``mpdiag.core.updates.UpdateStats``) into one int64
vector: the recorder reads it in the step's one transfer, the distributed reduction sums it across
ranks (each FSDP shard counts its own elements), and ``decode`` turns it into an UpdateStats.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from mpdiag.core import formats as fmts
from mpdiag.core.formats import Format
from mpdiag.core.updates import RATIO_BINS, RATIO_LOW, WEIGHT_BITS_AT_LEAST, UpdateStats
from mpdiag.record import _cpu_updates
from mpdiag.record._accumulate import is_dtensor

__all__ = ["stall_formats", "count_update", "decode", "second_moments"]

#: Elements counted at a time (see count_update).
CHUNK = 1 << 22

# The vector's leading slots; the stalled counts (one per format of stall_formats) and the ratio
# histogram follow. "with_grad" and "with_eps" count the ranks that had a gradient / an eps to judge.
_HEAD = ("numel", "nonzero", "from_zero", "with_grad", "grad_nonzero", "lost", "with_eps", "eps_dominated")


def stall_formats(dtype: torch.dtype, format_names: Sequence[str]) -> tuple[Format, ...]:
    """The tracked formats a weight of ``dtype`` could move to: storage dtypes narrower than it, of at
    least WEIGHT_BITS_AT_LEAST bits."""
    own = torch.finfo(dtype).bits
    return tuple(f for f in map(fmts.get, format_names) if f.dtype is not None and WEIGHT_BITS_AT_LEAST <= f.bits < own)


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if is_dtensor(x) else x


def count_update(
    before: torch.Tensor,
    update: torch.Tensor,
    grad: torch.Tensor | None,
    stall: tuple[Format, ...],
    second_moment: tuple[torch.Tensor, Any] | None,
) -> torch.Tensor:
    """One parameter's counts as an int64 vector on its device.

    ``update`` is the new weight minus ``before``, exact (fp64). A format's update stalls where the old weight, rounded
    to the format, plus the update in fp32 (the arithmetic torch's optimizers use for low-precision
    weights) rounds back to the same stored value. ``second_moment`` is (v, bound): Adam's eps dominates
    where v < bound = eps^2 * (1 - beta2^step), i.e. where sqrt(v / (1 - beta2^step)) < eps.
    """
    before, update = (_local(t).reshape(-1) for t in (before, update))
    if grad is not None:
        grad = _local(grad)
        if grad.layout != torch.strided:  # sparse (nn.Embedding(sparse=True)): which elements are non-zero
            grad = grad.to_dense()
    if second_moment is not None:
        second_moment = (_local(second_moment[0]), second_moment[1])
    if _cpu_updates.available(before):  # one compiled pass instead of some sixty torch ops
        return _cpu_updates.count(before, update, grad, second_moment, stall, len(_HEAD))
    grad_flat = grad.reshape(-1) if grad is not None else None
    v = second_moment[0].reshape(-1) if second_moment is not None else None
    bound = second_moment[1] if second_moment is not None else None
    total = None
    # In chunks: the masks, casts and ratios of one chunk at a time, so that the transient memory is
    # bounded (tens of bytes per element of a chunk) however large the parameter.
    for start in range(0, max(before.numel(), 1), CHUNK):
        part = slice(start, start + CHUNK)
        counts = _count_chunk(
            before[part],
            update[part],
            grad_flat[part] if grad_flat is not None else None,
            (v[part], bound) if v is not None else None,
            stall,
        )
        total = counts if total is None else total + counts
    assert total is not None  # the loop runs at least once
    return total


def _count_chunk(
    before: torch.Tensor,
    update: torch.Tensor,
    grad: torch.Tensor | None,
    second_moment: tuple[torch.Tensor, Any] | None,
    stall: tuple[Format, ...],
) -> torch.Tensor:
    device = update.device
    zero = torch.zeros((), dtype=torch.int64, device=device)
    changed = update != 0
    numel = torch.full((), before.numel(), dtype=torch.int64, device=device)
    head = [numel, changed.sum(), (changed & (before == 0)).sum()]
    if grad is not None:
        gradient_nonzero = grad != 0
        head += [zero + 1, gradient_nonzero.sum(), (gradient_nonzero & ~changed).sum()]
    else:
        head += [zero, zero, zero]
    if second_moment is not None:
        v, bound = second_moment
        head += [zero + 1, (v.double() < bound).sum()]
    else:
        head += [zero, zero]
    update32 = update.float()
    for f in stall:
        stored = before.to(f.dtype).float()
        back = (stored + update32).to(f.dtype).float()
        head.append((changed & (back == stored) & stored.isfinite()).sum())
    return torch.cat([torch.stack(head), _ratio_histogram(before, update, changed)])


def _ratio_histogram(before: torch.Tensor, update: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
    """Counts of floor(log2(|update| / |before|)) per bin, over changed elements with a non-zero weight."""
    ratio = update.abs() / before.double().abs()
    counted = changed & (before != 0) & ratio.isfinite()
    exponent = torch.frexp(ratio).exponent.to(torch.int64) - 1  # ratio = m * 2^e, m in [0.5, 1)
    index = torch.where(counted, (exponent - RATIO_LOW).clamp(0, RATIO_BINS - 1), RATIO_BINS).reshape(-1)
    counts = torch.zeros(RATIO_BINS + 1, dtype=torch.int64, device=update.device)
    counts.index_add_(0, index, torch.ones((), dtype=torch.int64, device=update.device).expand(index.numel()))
    return counts[:RATIO_BINS]


def decode(name: str, dtype: str, stall: tuple[Format, ...], counts: np.ndarray) -> UpdateStats:
    """The UpdateStats that ``count_update``'s vector (read to the host, maybe summed over ranks) holds."""
    head = dict(zip(_HEAD, (int(c) for c in counts[: len(_HEAD)])))
    stalled = counts[len(_HEAD) : len(_HEAD) + len(stall)]
    ratios = counts[len(_HEAD) + len(stall) :]
    with_grad, with_eps = head["with_grad"] > 0, head["with_eps"] > 0
    return UpdateStats(
        param=name,
        dtype=dtype,
        numel=head["numel"],
        nonzero=head["nonzero"],
        stalled={f.name: int(n) for f, n in zip(stall, stalled)},
        lost=head["lost"] if with_grad else None,
        grad_nonzero=head["grad_nonzero"] if with_grad else None,
        ratio_counts=tuple(int(c) for c in ratios),
        from_zero=head["from_zero"],
        eps_dominated=head["eps_dominated"] if with_eps else None,
        eps_numel=head["numel"] if with_eps else None,
    )


#: The optimizers whose denominator is sqrt(v / (1 - beta2^step)) + eps (torch's; subclasses too).
#: RAdam adds eps to the uncorrected root, and others (transformers' old AdamW) differ again.
BIAS_CORRECTED_ADAMS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam)


def second_moments(optimizer: torch.optim.Optimizer) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, Any]]]:
    """(parameter, (v, bound)) for each parameter that the step of an optimizer of BIAS_CORRECTED_ADAMS
    updated: v is the second moment the denominator uses (``max_exp_avg_sq`` under amsgrad), bound is
    eps^2 * (1 - beta2^step). Nothing is read to the host: a step count on the device stays there."""
    if not isinstance(optimizer, BIAS_CORRECTED_ADAMS):
        return
    for group in optimizer.param_groups:
        eps, betas = group.get("eps"), group.get("betas")
        if not isinstance(eps, (int, float)) or not isinstance(betas, (tuple, list)) or len(betas) != 2:
            continue
        beta2 = betas[1]
        for param in group["params"]:
            if param.grad is None:  # the step skipped it: its state is an earlier step's
                continue
            state = optimizer.state.get(param)
            if not state or "exp_avg_sq" not in state or "step" not in state:
                continue
            v = state.get("max_exp_avg_sq") if group.get("amsgrad") else state["exp_avg_sq"]
            step = state["step"]
            if not isinstance(v, torch.Tensor) or v.layout != torch.strided or v.shape != param.shape:
                continue  # not one moment per element of the parameter: no share of its elements
            step = _local(step).double() if isinstance(step, torch.Tensor) else float(step)
            yield param, (v, float(eps) ** 2 * (1 - beta2**step))
