"""Device-side accumulation of TensorStats: no host reads until the owner asks for one.

``SiteAccumulator.observe`` runs inside hooks. It only launches device ops whose output shapes are
known in advance (bucketize, a fixed-size index_add, full reductions): no ``.item()``, no boolean-mask
indexing, nothing that makes the host wait. ``read_many`` then moves every accumulator's tensors to the
host in one transfer per device and decodes them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping
from dataclasses import replace

import numpy as np
import torch

from mpdiag._layout import BucketLayout, layout_for
from mpdiag.stats import TensorStats

log = logging.getLogger(__name__)

#: Why a tensor was not observed, for tensors that have no floating values to classify.
SKIP_REASONS = {
    "not_floating": "integer and bool tensors have no cast to classify",
    "complex": "complex tensors are not classified (view them as real with torch.view_as_real to record them)",
    "sparse": "sparse tensors are not classified (record their .values() to include them)",
    "meta": "meta tensors hold no data",
}


def skip_reason(x: torch.Tensor) -> str | None:
    """Why ``x`` is not observed, or None when it is. Complex, sparse and meta tensors are skipped."""
    if x.is_complex():
        return "complex"
    if not x.is_floating_point():
        return "not_floating"
    if x.layout != torch.strided:
        return "sparse"
    if x.device.type == "meta":
        return "meta"
    return None


def _ext_dtype(device: torch.device) -> torch.dtype:
    # amax/amin are kept in fp64 where the device has it, so fp64 inputs keep their range.
    return torch.float32 if device.type == "mps" else torch.float64


class _Part:
    """Counts and extremes of the tensors of one source dtype on one device."""

    __slots__ = ("layout", "counts", "ext")

    def __init__(self, layout: BucketLayout, device: torch.device) -> None:
        self.layout = layout
        self.counts = torch.zeros(layout.n_buckets, dtype=torch.int64, device=device)
        # ext = [amax, -amin_nonzero]: both reduce with maximum, so one op updates them.
        self.ext = torch.tensor([0.0, -math.inf], dtype=_ext_dtype(device), device=device)


class SiteAccumulator:
    """Accumulates the statistics of every tensor observed at one site, on the tensors' devices."""

    def __init__(self, format_names: tuple[str, ...]) -> None:
        self.format_names = format_names
        self._parts: dict[tuple[torch.dtype, torch.device], _Part] = {}
        self.dtypes: set[str] = set()
        self.calls = 0
        self.skipped: dict[str, int] = {}

    @property
    def empty(self) -> bool:
        return self.calls == 0

    def reset(self) -> None:
        self._parts.clear()
        self.dtypes.clear()
        self.calls = 0
        self.skipped.clear()

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Add ``x``'s statistics. Never changes ``x``; never waits for the device."""
        reason = skip_reason(x)
        if reason is not None:
            self.skipped[reason] = self.skipped.get(reason, 0) + 1
            return
        x = x.detach()
        self.calls += 1
        self.dtypes.add(str(x.dtype).replace("torch.", ""))
        if x.numel() == 0:
            return
        layout = layout_for(x.dtype, self.format_names)
        x = x.to(layout.source)  # no-op except for fp8 inputs, which widen exactly
        part = self._part(layout, x.device)
        buckets = torch.bucketize(x, layout.edges_on(x.device)).reshape(-1)
        part.counts.index_add_(0, buckets, torch.ones((), dtype=torch.int64, device=x.device).expand(buckets.numel()))
        magnitude = torch.nan_to_num(x.abs(), nan=0.0, posinf=0.0)
        amax = magnitude.amax()
        amin = torch.where(magnitude > 0, magnitude, math.inf).amin()
        torch.maximum(part.ext, torch.stack([amax, -amin]).to(part.ext.dtype), out=part.ext)

    def _part(self, layout: BucketLayout, device: torch.device) -> _Part:
        key = (layout.source, device)
        part = self._parts.get(key)
        if part is None:
            # Created as a normal tensor even inside inference_mode, so that later in-place updates
            # outside it are allowed.
            with torch.inference_mode(False):
                part = self._parts[key] = _Part(layout, device)
        return part

    def read(self) -> TensorStats:
        """This accumulator's statistics, read from the device now."""
        return read_many({None: self})[None]


def read_many(accumulators: Mapping[Hashable, SiteAccumulator]) -> dict[Hashable, TensorStats]:
    """Read every accumulator with one device-to-host transfer per device and decode them."""
    by_device: dict[torch.device, list[tuple[Hashable, _Part]]] = {}
    for key, acc in accumulators.items():
        for (_, device), part in acc._parts.items():
            by_device.setdefault(device, []).append((key, part))
    decoded: dict[Hashable, list[TensorStats]] = {key: [] for key in accumulators}
    for device, items in by_device.items():
        packed = torch.cat([t for _, part in items for t in (part.counts, _as_int64(part.ext))]).cpu().numpy()
        offset = 0
        for key, part in items:
            n = part.layout.n_buckets
            counts, ext = packed[offset:offset + n], _from_int64(packed[offset + n:offset + n + 2], part.ext.dtype)
            offset += n + 2
            fields = part.layout.decode(counts)
            decoded[key].append(TensorStats(accumulators[key].format_names, amax=float(ext[0]),
                                            amin_nonzero=float(-ext[1]), **fields))
    return {key: _finish(acc, decoded[key]) for key, acc in accumulators.items()}


def _finish(acc: SiteAccumulator, parts: list[TensorStats]) -> TensorStats:
    merged = TensorStats.merge_all(parts, acc.format_names)
    return replace(merged, dtypes=frozenset(acc.dtypes), calls=acc.calls)


def _as_int64(ext: torch.Tensor) -> torch.Tensor:
    # Pack floats as their bit patterns so one int64 transfer carries counts and extremes together.
    return ext.view(torch.int64) if ext.dtype == torch.float64 else ext.view(torch.int32).to(torch.int64)


def _from_int64(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    if dtype == torch.float64:
        return bits.view(np.float64)
    return bits.astype(np.int32).view(np.float32).astype(np.float64)
