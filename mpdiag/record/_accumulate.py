"""Device-side accumulation of TensorStats: no host reads until the owner asks for one.

``measure`` runs inside hooks. On any device it only launches ops whose output shapes are known in
advance (bucketize, a fixed-size index_add, full reductions): no ``.item()``, no boolean-mask indexing,
nothing that makes the host wait. CPU tensors go through a compiled kernel that assigns the same
buckets (``_cpu_kernel``). ``read_many`` moves every accumulator's tensors to the host in one transfer
per device and decodes them.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from mpdiag.record import _cpu_kernel
from mpdiag.record._layout import BucketLayout, layout_for
from mpdiag.core.stats import DEFAULT_FORMATS, FormatSpecs, TensorStats, format_names

#: Why a tensor was not observed, for tensors that have no floating values to classify.
SKIP_REASONS = {
    "not_floating": "integer and bool tensors have no cast to classify",
    "complex": "complex tensors are not classified (view them as real with torch.view_as_real to record them)",
    "sparse": "sparse tensors are not classified (record their .values() to include them)",
    "meta": "meta tensors hold no data",
}


def skip_reason(x: torch.Tensor) -> str | None:
    """Why ``x`` is not observed, or None when it is. Complex, sparse and meta tensors are skipped."""
    if not x.is_floating_point():
        return "complex" if x.is_complex() else "not_floating"
    if x.layout != torch.strided:
        return "sparse"
    if x.is_meta:
        return "meta"
    return None


_DTYPE_NAMES = {d: str(d).replace("torch.", "") for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}


def is_dtensor(x: torch.Tensor) -> bool:
    """A torch.distributed DTensor, told by its type's name so that torch.distributed need not be imported."""
    return type(x).__name__ == "DTensor"


def use_cpu_kernel() -> bool:
    """Whether CPU tensors go through the compiled kernel (numba installed, not disabled)."""
    return _cpu_kernel.available()


_NO_EXTREMES = np.array([0.0, -math.inf])  # [amax, -amin_nonzero] before any value: both reduce with maximum


def _ext_dtype(device: torch.device) -> torch.dtype:
    # amax/amin are kept in fp64 where the device has it, so fp64 inputs keep their range.
    return torch.float32 if device.type == "mps" else torch.float64


class _Part:
    """Bucket counts and extremes of tensors of one source dtype on one device.

    Device tensors on the tensors' device; plain numpy arrays for CPU tensors that the compiled
    kernel measures (they are on the host already, and numpy arrays are far cheaper to make and add).
    """

    __slots__ = ("layout", "device", "on_host", "counts", "ext")

    def __init__(self, layout: BucketLayout, device: torch.device, on_host: bool) -> None:
        self.layout, self.device, self.on_host = layout, device, on_host
        if on_host:
            self.counts = np.zeros(layout.n_buckets, dtype=np.int64)
            self.ext = _NO_EXTREMES.copy()
            return
        # Normal tensors even when created inside inference_mode, so in-place updates outside it work.
        with torch.inference_mode(False):
            self.counts = torch.zeros(layout.n_buckets, dtype=torch.int64, device=device)
            # filled on the device: torch.tensor([...], device=...) would copy from the host each time
            self.ext = torch.full((2,), -math.inf, dtype=_ext_dtype(device), device=device)
            self.ext[0] = 0.0

    def copy(self) -> _Part:
        """A part of its own with the same values."""
        part = _Part.__new__(_Part)
        part.layout, part.device, part.on_host = self.layout, self.device, self.on_host
        if self.on_host:
            part.counts, part.ext = self.counts.copy(), self.ext.copy()
        else:
            with torch.inference_mode(False):  # as in __init__
                part.counts, part.ext = self.counts.clone(), self.ext.clone()
        return part

    def add(self, other: _Part) -> None:
        self.counts += other.counts
        if self.on_host:
            np.maximum(self.ext, other.ext, out=self.ext)
        else:
            torch.maximum(self.ext, other.ext, out=self.ext)


class Observation:
    """The statistics of one tensor, still on its device. One observation can feed several sites
    (a Sequential returns its last child's output: both sites see the same tensor).

    ``nonfinite`` is how many NaN/inf it holds where that is known already (the host kernel), else None.
    """

    __slots__ = ("part", "dtype", "numel", "nonfinite")

    def __init__(self, part: _Part, dtype: str, numel: int, nonfinite: int | None) -> None:
        self.part, self.dtype, self.numel, self.nonfinite = part, dtype, numel, nonfinite


def measure(x: torch.Tensor, format_names: tuple[str, ...]) -> Observation:
    """Statistics of ``x`` (a strided floating tensor), left on its device. Never changes ``x``.

    No autograd context is needed: every op reads ``x.detach()`` or writes mpdiag's own tensors.
    """
    x = x.detach()
    if is_dtensor(x):  # a shard of a distributed tensor (FSDP2): this rank's own part
        x = x.to_local()
    dtype = x.dtype
    layout = layout_for(dtype, format_names)
    on_host = x.is_cpu and use_cpu_kernel()
    part = _Part(layout, x.device, on_host)
    numel = x.numel()
    nonfinite = 0 if on_host else None
    if numel:
        if dtype != layout.source:
            x = x.to(layout.source)  # fp8 inputs widen exactly
        if on_host:
            _cpu_kernel.count_into(x, layout, part.counts, part.ext)
            nan, posinf, neginf = layout.nonfinite_buckets
            nonfinite = int(part.counts[nan] + part.counts[posinf] + part.counts[neginf])
        else:
            _measure_with_torch(x, part)
    return Observation(part, _DTYPE_NAMES.get(dtype) or str(dtype).replace("torch.", ""), numel, nonfinite)


def _measure_with_torch(x: torch.Tensor, part: _Part) -> None:
    """Any device: one bucketize against the layout's edges and a fixed-size histogram."""
    # bucketize copies a non-contiguous input anyway, and warns about it; copy without the warning.
    buckets = torch.bucketize(x.contiguous(), part.layout.edges_on(x.device)).reshape(-1)
    part.counts.index_add_(0, buckets, torch.ones((), dtype=torch.int64, device=x.device).expand(buckets.numel()))
    magnitude = torch.nan_to_num(x.abs(), nan=0.0, posinf=0.0)
    amax = magnitude.amax()
    amin = torch.where(magnitude > 0, magnitude, math.inf).amin()
    part.ext.copy_(torch.stack([amax, -amin]))


class SiteAccumulator:
    """Accumulates the statistics of every tensor observed at one site, on the tensors' devices."""

    def __init__(self, format_names: tuple[str, ...]) -> None:
        self.format_names = format_names
        self._parts: dict[tuple[torch.dtype, torch.device, bool], _Part] = {}
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

    def observe(self, x: torch.Tensor) -> None:
        """Add ``x``'s statistics (skipping tensors ``skip_reason`` names). Never waits for the device."""
        reason = skip_reason(x)
        if reason is not None:
            self.skipped[reason] = self.skipped.get(reason, 0) + 1
            return
        self.add(measure(x, self.format_names))

    def add(self, obs: Observation) -> None:
        self.calls += 1
        self.dtypes.add(obs.dtype)
        if obs.numel == 0:
            return
        src = obs.part
        key = (src.layout.source, src.device, src.on_host)
        part = self._parts.get(key)
        if part is None:  # a copy, not a share: the observation may feed another site
            self._parts[key] = src.copy()
        else:
            part.add(src)

    def read(self) -> TensorStats:
        """This accumulator's statistics, read from the device now."""
        return read_many({None: self})[None]


def tensor_stats(tensor: torch.Tensor, formats: FormatSpecs = DEFAULT_FORMATS) -> TensorStats:
    """The statistics of one tensor, computed now (this reads the result back to the host once).

    Examples:
        >>> import torch, mpdiag
        >>> s = mpdiag.tensor_stats(torch.tensor([0.0, 1e-8, 3.0, 7e4]), formats="fp16")
        >>> s.zeros, s.underflow("fp16"), s.overflow("fp16")
        (1, 1, 1)
    """
    acc = SiteAccumulator(format_names(formats))
    acc.observe(tensor)
    return acc.read()


def read_many(accumulators: Mapping[Hashable, SiteAccumulator]) -> dict[Hashable, TensorStats]:
    """Read every accumulator with one device-to-host transfer per device and decode them."""
    return read_with_extras(accumulators, [])[0]


def read_with_extras(accumulators: Mapping[Hashable, SiteAccumulator],
                     extras: Sequence[torch.Tensor]) -> tuple[dict[Hashable, TensorStats], list[np.ndarray]]:
    """read_many, plus small int64 device tensors (``extras``) read in the same transfer per device."""
    rows: list[tuple[Hashable, BucketLayout, np.ndarray, np.ndarray]] = []
    on_device: dict[torch.device, list[tuple[Hashable, _Part]]] = {}
    for key, acc in accumulators.items():
        for part in acc._parts.values():
            if part.on_host:
                rows.append((key, part.layout, part.counts, part.ext))
            else:
                on_device.setdefault(part.device, []).append((key, part))
    extras_by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(extras):
        extras_by_device.setdefault(t.device, []).append(i)
    extras_host: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(extras)
    for device in on_device.keys() | extras_by_device.keys():
        items = on_device.get(device, [])
        own = [extras[i].reshape(-1) for i in extras_by_device.get(device, [])]
        packed = torch.cat([t for _, part in items for t in (part.counts, _as_int64(part.ext))] + own).cpu().numpy()
        offset = 0
        for key, part in items:
            n = part.layout.n_buckets
            ext = _from_int64(packed[offset + n:offset + n + 2], part.ext.dtype)
            rows.append((key, part.layout, packed[offset:offset + n], ext))
            offset += n + 2
        for i in extras_by_device.get(device, []):
            size = extras[i].numel()
            extras_host[i] = packed[offset:offset + size]
            offset += size
    by_layout: dict[BucketLayout, list[tuple[Hashable, np.ndarray, np.ndarray]]] = {}
    for key, layout, counts, ext in rows:
        by_layout.setdefault(layout, []).append((key, counts, ext))
    decoded: dict[Hashable, list[dict[str, Any]]] = {key: [] for key in accumulators}
    for layout, items in by_layout.items():
        fields = layout.decode_many(np.stack([counts for _, counts, _ in items]))
        for (key, _, ext), f in zip(items, fields):
            decoded[key].append({**f, "amax": float(ext[0]), "amin_nonzero": float(-ext[1])})
    return {key: _finish(acc, decoded[key]) for key, acc in accumulators.items()}, extras_host


def _finish(acc: SiteAccumulator, parts: list[dict[str, Any]]) -> TensorStats:
    """One TensorStats from the decoded parts of one site (usually one: a single dtype and device)."""
    if len(parts) == 1:  # the common case builds one TensorStats, not one per part plus a merge
        return TensorStats(acc.format_names, dtypes=frozenset(acc.dtypes), calls=acc.calls, **parts[0])
    merged = TensorStats.merge_all([TensorStats(acc.format_names, **p) for p in parts], acc.format_names)
    return replace(merged, dtypes=frozenset(acc.dtypes), calls=acc.calls)


def _as_int64(ext: torch.Tensor) -> torch.Tensor:
    # Pack floats as their bit patterns so one int64 transfer carries counts and extremes together.
    return ext.view(torch.int64) if ext.dtype == torch.float64 else ext.view(torch.int32).to(torch.int64)


def _from_int64(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    if dtype == torch.float64:
        return bits.view(np.float64)
    return bits.astype(np.int32).view(np.float32).astype(np.float64)
