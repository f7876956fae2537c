"""Device-side accumulation of TensorStats: no host reads until the owner asks for one.

``measure`` runs inside hooks. On any device it only launches ops whose output shapes are known in
advance: no ``.item()``, no boolean-mask indexing, nothing that makes the host wait. CUDA tensors go
through one fused Triton kernel (``_triton_kernel``), CPU tensors through a compiled numba kernel
(``_cpu_kernel``); both assign the buckets of the torch-ops path (a bucketize, a fixed-size index_add,
full reductions), which measures everything else (MPS, no Triton, no numba). ``read_many`` moves every
accumulator's tensors to the host in one transfer per device and decodes them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias, TypeGuard, TypeVar

import numpy as np
import torch

from mpdiag.core.stats import DEFAULT_FORMATS, STATS, FormatSpecs, Reduce, Source, Stat, TensorStats, format_names
from mpdiag.record import _cpu_kernel, _triton_kernel
from mpdiag.record._layout import DECODED, BucketLayout, layout_for

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

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


def is_dtensor(x: torch.Tensor) -> TypeGuard[DTensor]:
    """A torch.distributed DTensor, told by its type's name so that torch.distributed need not be imported."""
    return type(x).__name__ == "DTensor"


def use_cpu_kernel() -> bool:
    """Whether CPU tensors go through the compiled kernel (numba installed, not disabled)."""
    return _cpu_kernel.available()


def use_triton_kernel(x: torch.Tensor) -> bool:
    """Whether ``x`` is measured by the fused Triton kernel: a CUDA tensor (not ROCm) where Triton is usable."""
    return x.is_cuda and torch.version.cuda is not None and _triton_kernel.available()


def _float_dtype(device: torch.device) -> torch.dtype:
    # Device statistics are kept in fp64 where the device has it, so fp64 inputs keep their range.
    return torch.float32 if device.type == "mps" else torch.float64


#: What a part holds its counts and device statistics in: numpy arrays on the host, else tensors.
_Held = TypeVar("_Held", np.ndarray, torch.Tensor)
#: The keys the caller reads accumulators by (sites, for the recorder).
_Key = TypeVar("_Key", bound=Hashable)


class _DeviceStats:
    """The statistics a kernel computes per tensor (``Source.DEVICE``), as one float vector per part.

    Ordered so that they combine in at most two ops, on a part, in the one transfer and across ranks:
    those that reduce by SUM first, then those that reduce by MAX, then the MIN ones negated (the
    minimum of x is minus the maximum of -x), so that everything past the sums combines with a maximum.
    """

    def __init__(self, stats: Sequence[Stat], defaults: Mapping[str, float]) -> None:
        by_reduce = {r: [s for s in stats if s.source is Source.DEVICE and s.reduce is r] for r in Reduce}
        if by_reduce[Reduce.UNION]:
            raise TypeError(f"device statistics cannot reduce by union: {by_reduce[Reduce.UNION]}")
        self.order = by_reduce[Reduce.SUM] + by_reduce[Reduce.MAX] + by_reduce[Reduce.MIN]
        self.names = [s.name for s in self.order]
        self.n_sum = len(by_reduce[Reduce.SUM])
        self.sign = np.array([-1.0 if s.reduce is Reduce.MIN else 1.0 for s in self.order])
        self.initial = self.sign * np.array([defaults[n] for n in self.names], dtype=np.float64)
        self._signed = list(zip(self.names, self.sign.tolist()))
        # A new device vector: one fill with the commonest initial value, then the others one by one.
        values = self.initial.tolist()
        self.fill = max(set(values), key=values.count) if values else 0.0
        self.not_fill = [(i, v) for i, v in enumerate(values) if v != self.fill]

    def pack(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A kernel's values (0-dim tensors) by name -> the part's vector, on their device."""
        return torch.stack([values[n] if sign > 0 else -values[n] for n, sign in self._signed])

    def pack_into(self, vector: np.ndarray, values: Mapping[str, float]) -> None:
        """A kernel's values (floats) by name -> ``vector``, in place (the host kernel's path: no arrays made)."""
        for i, (name, sign) in enumerate(self._signed):
            vector[i] = values[name] if sign > 0 else -values[name]

    def unpack(self, vector: np.ndarray) -> dict[str, float]:
        return dict(zip(self.names, (self.sign * vector).tolist()))

    def combine(self, into: _Held, other: _Held) -> None:
        """into <- into combined with other, in place (numpy arrays or tensors alike). Runs for every
        observation a site adds: without summed statistics, one maximum of the whole vectors."""
        if not self.n_sum:
            tail, other_tail = into, other
        else:
            into[: self.n_sum] += other[: self.n_sum]
            tail, other_tail = into[self.n_sum :], other[self.n_sum :]
        if isinstance(into, np.ndarray):
            np.maximum(tail, other_tail, out=tail)
        else:
            torch.maximum(tail, other_tail, out=tail)


DEVICE_STATS = _DeviceStats(
    STATS, {f.name: f.default for f in dataclasses.fields(TensorStats) if f.default is not dataclasses.MISSING}
)


def _triton_value_slots(stats: _DeviceStats) -> tuple[int, int]:
    """Where the Triton kernel writes amax and minus amin_nonzero in the device vector: the only device
    statistics it computes, so a new one must be added to the kernel too (else it would read as 0)."""
    signs = dict(zip(stats.names, stats.sign.tolist()))
    if signs != {"amax": 1.0, "amin_nonzero": -1.0}:
        raise TypeError(
            f"device statistics {stats.names} differ from those the Triton kernel computes (amax, "
            "amin_nonzero): compute the new ones in _triton_source.count_kernel"
        )
    return stats.names.index("amax"), stats.names.index("amin_nonzero")


_TRITON_SLOTS = _triton_value_slots(DEVICE_STATS)
#: The statistics counted on the host as tensors are observed, and read from the accumulator as they are.
HOST_STATS = tuple(s.name for s in STATS if s.source is Source.HOST)


def _check_decoded(stats: Sequence[Stat]) -> None:
    """A statistic declared to come from the buckets must be one the layout decodes: else it would
    silently read as its default."""
    declared = {s.name for s in stats if s.source is Source.BUCKETS}
    if declared != set(DECODED):
        raise TypeError(
            f"statistics declared Source.BUCKETS {sorted(declared)} differ from those the bucket "
            f"layout decodes {sorted(DECODED)}: decode the new ones in _layout.decode_many"
        )


_check_decoded(STATS)


class _Part:
    """Bucket counts and device statistics of tensors of one source dtype on one device: a ``_HostPart``
    (numpy arrays) or a ``_DevicePart`` (tensors); ``Part`` is either."""

    __slots__ = ("layout", "device", "counts", "values")

    on_host: ClassVar[bool]
    layout: BucketLayout
    device: torch.device


class _HostPart(_Part):
    """Plain numpy arrays, for CPU tensors that the compiled kernel measures (they are on the host
    already, and numpy arrays are far cheaper to make and add)."""

    __slots__ = ()

    on_host = True
    counts: np.ndarray
    values: np.ndarray

    def __init__(self, layout: BucketLayout, device: torch.device, *, initial: bool = True) -> None:
        """``initial=False`` leaves the device statistics unset, for a caller that overwrites them all."""
        self.layout, self.device = layout, device
        self.counts = np.zeros(layout.n_buckets, dtype=np.int64)
        self.values = DEVICE_STATS.initial.copy() if initial else np.empty_like(DEVICE_STATS.initial)

    def copy(self) -> _HostPart:
        """A part of its own with the same values."""
        part = _HostPart.__new__(_HostPart)
        part.layout, part.device = self.layout, self.device
        part.counts, part.values = self.counts.copy(), self.values.copy()
        return part

    def add(self, other: _HostPart) -> None:  # parts share a key, on_host included, only with their own kind
        self.counts += other.counts
        DEVICE_STATS.combine(self.values, other.values)


class _DevicePart(_Part):
    """Tensors on the tensors' device."""

    __slots__ = ()

    on_host = False
    counts: torch.Tensor
    values: torch.Tensor

    def __init__(self, layout: BucketLayout, device: torch.device, *, initial: bool = True) -> None:
        """``initial=False`` leaves the device statistics unset, for a caller that overwrites them all
        (one launch instead of a fill and a write per value that differs)."""
        self.layout, self.device = layout, device
        # Normal tensors even when created inside inference_mode, so in-place updates outside it work.
        with torch.inference_mode(False):
            self.counts = torch.zeros(layout.n_buckets, dtype=torch.int64, device=device)
            shape, dtype = DEVICE_STATS.initial.shape, _float_dtype(device)
            if not initial:
                self.values = torch.empty(shape, dtype=dtype, device=device)
                return
            # filled on the device: torch.tensor([...], device=...) would copy from the host each time
            self.values = torch.full(shape, DEVICE_STATS.fill, dtype=dtype, device=device)
            for i, value in DEVICE_STATS.not_fill:
                self.values[i] = value

    @classmethod
    def of_buffer(cls, layout: BucketLayout, buffer: torch.Tensor) -> _DevicePart:
        """A part over one int64 buffer: the layout's bucket counts, then the device statistics' float64 bits."""
        part = cls.__new__(cls)
        part.layout, part.device = layout, buffer.device
        part.counts, part.values = buffer[: layout.n_buckets], buffer[layout.n_buckets :].view(torch.float64)
        return part

    def copy(self) -> _DevicePart:
        """A part of its own with the same values."""
        part = _DevicePart.__new__(_DevicePart)
        part.layout, part.device = self.layout, self.device
        with torch.inference_mode(False):  # as in __init__
            part.counts, part.values = self.counts.clone(), self.values.clone()
        return part

    def add(self, other: _DevicePart) -> None:  # as in _HostPart.add
        self.counts += other.counts
        DEVICE_STATS.combine(self.values, other.values)


Part: TypeAlias = _HostPart | _DevicePart


def _new_part(layout: BucketLayout, device: torch.device, on_host: bool) -> Part:
    return _HostPart(layout, device) if on_host else _DevicePart(layout, device)


class Observation:
    """The statistics of one tensor, still on its device. One observation can feed several sites
    (a Sequential returns its last child's output: both sites see the same tensor).

    ``nonfinite`` is how many NaN/inf it holds where that is known already (the host kernel), else None.
    """

    __slots__ = ("part", "dtype", "numel", "nonfinite")

    def __init__(self, part: Part, dtype: str, numel: int, nonfinite: int | None) -> None:
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
    numel = x.numel()
    name = _DTYPE_NAMES.get(dtype) or str(dtype).replace("torch.", "")
    if numel and dtype != layout.source:
        x = x.to(layout.source)  # fp8 inputs widen exactly
    if numel and not on_host and use_triton_kernel(x):
        buffer = _triton_kernel.count(x, layout, *_TRITON_SLOTS, len(DEVICE_STATS.names))
        return Observation(_DevicePart.of_buffer(layout, buffer), name, numel, None)
    # what _new_part does, inline: this runs for every tensor observed. The kernels below write every
    # device statistic of a non-empty tensor, so only an empty one needs their initial values.
    kind = _HostPart if on_host else _DevicePart
    part: Part = kind(layout, x.device, initial=not numel)
    nonfinite = 0 if on_host else None
    if numel:
        if isinstance(part, _HostPart):  # on_host
            DEVICE_STATS.pack_into(part.values, _cpu_kernel.count_into(x, layout, part.counts))
            nan, posinf, neginf = layout.nonfinite_buckets
            nonfinite = int(part.counts[nan] + part.counts[posinf] + part.counts[neginf])
        else:
            _measure_with_torch(x, part)
    return Observation(part, name, numel, nonfinite)


def _measure_with_torch(x: torch.Tensor, part: _DevicePart) -> None:
    """Any device: one bucketize against the layout's edges and a fixed-size histogram."""
    # bucketize copies a non-contiguous input anyway, and warns about it; copy without the warning.
    buckets = torch.bucketize(x.contiguous(), part.layout.edges_on(x.device)).reshape(-1)
    part.counts.index_add_(0, buckets, torch.ones((), dtype=torch.int64, device=x.device).expand(buckets.numel()))
    magnitude = torch.nan_to_num(x.abs(), nan=0.0, posinf=0.0)
    part.values.copy_(
        DEVICE_STATS.pack(
            {
                "amax": magnitude.amax(),
                "amin_nonzero": torch.where(magnitude > 0, magnitude, math.inf).amin(),
            }
        )
    )


class SiteAccumulator:
    """Accumulates the statistics of every tensor observed at one site, on the tensors' devices.

    Its parts (one per source dtype and device) stay inside: ``read_many`` reads them, and the
    distributed reduction works through ``host_stats``, ``sources``, ``gathered`` and ``reduce_parts``.
    """

    def __init__(self, format_names: tuple[str, ...]) -> None:
        self.format_names = format_names
        self._parts: dict[tuple[torch.dtype, torch.device, bool], Part] = {}
        # Parts that are an observation's own, taken without a copy (most sites see one tensor a step):
        # copied before anything is added to them, since the observation may feed another site.
        self._borrowed: set[tuple[torch.dtype, torch.device, bool]] = set()
        self.dtypes: set[str] = set()
        self.calls = 0

    @property
    def empty(self) -> bool:
        return self.calls == 0

    def reset(self) -> None:
        self._parts.clear()
        self._borrowed.clear()
        self.dtypes.clear()
        self.calls = 0

    def observe(self, x: torch.Tensor) -> None:
        """Add ``x``'s statistics (skipping tensors ``skip_reason`` names). Never waits for the device."""
        if skip_reason(x) is None:
            self.add(measure(x, self.format_names))

    def add(self, obs: Observation) -> None:
        self.calls += 1
        self.dtypes.add(obs.dtype)
        if obs.numel == 0:
            return
        src = obs.part
        key = (src.layout.source, src.device, src.on_host)
        part = self._parts.get(key)
        if part is None:
            self._parts[key] = src
            self._borrowed.add(key)
            return
        if key in self._borrowed:
            part = self._parts[key] = part.copy()
            self._borrowed.discard(key)
        part.add(src)  # type: ignore[arg-type] # the key holds on_host: part and src are of one kind

    def read(self) -> TensorStats:
        """This accumulator's statistics, read from the device now."""
        return read_many({None: self})[None]

    # -- for the distributed reduction ------------------------------------------------------------
    def host_stats(self) -> dict[str, Any]:
        """The statistics counted on the host (``HOST_STATS``), by name."""
        values = {name: getattr(self, name) for name in HOST_STATS}
        return {name: frozenset(v) if isinstance(v, set) else v for name, v in values.items()}

    def set_host_stats(self, stats: Mapping[str, Any]) -> None:
        for name in HOST_STATS:
            value = stats[name]
            setattr(self, name, set(value) if isinstance(value, frozenset) else value)

    def sources(self) -> set[torch.dtype]:
        """The source dtypes of the tensors observed (what their buckets are laid out by)."""
        return {source for source, _, _ in self._parts}

    def gathered(self, source: torch.dtype, device: torch.device) -> Part:
        """This accumulator's parts of ``source`` merged into one on ``device`` (the parts it replaces may
        be on several devices), created empty when no such tensor was observed."""
        mine = [key for key in self._parts if key[0] == source]
        on_host = device.type == "cpu"
        part = _new_part(layout_for(source, self.format_names), device, on_host)
        for key in mine:
            other = self._parts.pop(key)
            self._borrowed.discard(key)
            part.counts += _as_held(other.counts, part)
            DEVICE_STATS.combine(part.values, _as_held(other.values, part))
        self._parts[(source, device, on_host)] = part
        return part


def _as_held(value: np.ndarray | torch.Tensor, part: Part) -> Any:
    """``value`` (a numpy array or a tensor anywhere) as ``part`` holds its own: numpy on the host, else
    a tensor of the part's dtype on its device."""
    if isinstance(part, _HostPart):  # on_host
        return value if isinstance(value, np.ndarray) else value.detach().cpu().numpy()
    tensor = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
    return tensor.to(part.device, part.values.dtype if tensor.is_floating_point() else tensor.dtype)


def reduce_parts(
    parts: Sequence[Part],
    all_reduce: Callable[[torch.Tensor, Reduce], None],
    device: torch.device,
    stats: _DeviceStats = DEVICE_STATS,
) -> None:
    """Reduce ``parts`` (from ``gathered``, in an order every rank shares) in place with ``all_reduce``
    (a collective given a tensor and SUM or MAX): one call per kind of reduction that the declared
    statistics need: the bucket counts and the summed device statistics by SUM, the rest by MAX."""
    if not parts:
        return
    n = stats.n_sum
    groups = [
        (Reduce.SUM, "counts", slice(None)),
        (Reduce.SUM, "values", slice(0, n)),
        (Reduce.MAX, "values", slice(n, None)),
    ]
    for reduce, attr, piece in groups:
        pieces = [_as_tensor(getattr(p, attr), device)[piece] for p in parts]
        if not pieces[0].numel():
            continue
        packed = torch.cat([x.to(torch.float64) if attr == "values" else x for x in pieces])
        all_reduce(packed, reduce)
        offset = 0
        for p, x in zip(parts, pieces):
            size = x.numel()
            target = getattr(p, attr)[piece]
            reduced = packed[offset : offset + size]
            if p.on_host:
                target[:] = reduced.cpu().numpy()
            else:
                target.copy_(reduced.to(target.dtype))
            offset += size


def _as_tensor(value: Any, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(value).to(device) if isinstance(value, np.ndarray) else value.to(device)


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


def read_many(accumulators: Mapping[_Key, SiteAccumulator]) -> dict[_Key, TensorStats]:
    """Read every accumulator with one device-to-host transfer per device and decode them."""
    return read_with_extras(accumulators, [])[0]


def read_with_extras(
    accumulators: Mapping[_Key, SiteAccumulator], extras: Sequence[torch.Tensor]
) -> tuple[dict[_Key, TensorStats], list[np.ndarray]]:
    """read_many, plus small int64 device tensors (``extras``) read in the same transfer per device."""
    rows: list[tuple[_Key, BucketLayout, np.ndarray, np.ndarray]] = []
    on_device: dict[torch.device, list[tuple[_Key, _DevicePart]]] = {}
    for key, acc in accumulators.items():
        for part in acc._parts.values():
            if isinstance(part, _HostPart):  # on_host
                rows.append((key, part.layout, part.counts, part.values))
            else:
                on_device.setdefault(part.device, []).append((key, part))
    extras_by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(extras):
        extras_by_device.setdefault(t.device, []).append(i)
    extras_host: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(extras)
    for device in on_device.keys() | extras_by_device.keys():
        items = on_device.get(device, [])
        own = [extras[i].reshape(-1) for i in extras_by_device.get(device, [])]
        packed = torch.cat([t for _, part in items for t in (part.counts, _as_int64(part.values))] + own).cpu().numpy()
        offset = 0
        for key, part in items:
            n = part.layout.n_buckets
            n_values = part.values.shape[0]
            values = _from_int64(packed[offset + n : offset + n + n_values], part.values.dtype)
            rows.append((key, part.layout, packed[offset : offset + n], values))
            offset += n + n_values
        for i in extras_by_device.get(device, []):
            size = extras[i].numel()
            extras_host[i] = packed[offset : offset + size]
            offset += size
    by_layout: dict[BucketLayout, list[tuple[_Key, np.ndarray, np.ndarray]]] = {}
    for key, layout, counts, values in rows:
        by_layout.setdefault(layout, []).append((key, counts, values))
    decoded: dict[_Key, list[dict[str, Any]]] = {key: [] for key in accumulators}
    for layout, entries in by_layout.items():
        fields = layout.decode_many(np.stack([counts for _, counts, _ in entries]))
        for (key, _, values), f in zip(entries, fields):
            decoded[key].append({**f, **DEVICE_STATS.unpack(values)})
    if use_cpu_kernel():
        _cpu_kernel.compile_wanted()  # a step's statistics are read: compile its threaded kernels now
    return {key: _finish(acc, decoded[key]) for key, acc in accumulators.items()}, extras_host


def _finish(acc: SiteAccumulator, parts: list[dict[str, Any]]) -> TensorStats:
    """One TensorStats from the decoded parts of one site (usually one: a single dtype and device)."""
    if len(parts) == 1:  # the common case builds one TensorStats, not one per part plus a merge
        return TensorStats(acc.format_names, **acc.host_stats(), **parts[0])
    merged = TensorStats.merge_all([TensorStats(acc.format_names, **p) for p in parts], acc.format_names)
    return replace(merged, **acc.host_stats())


def _as_int64(values: torch.Tensor) -> torch.Tensor:
    # Pack floats as their bit patterns so one int64 transfer carries counts and statistics together.
    return values.view(torch.int64) if values.dtype == torch.float64 else values.view(torch.int32).to(torch.int64)


def _from_int64(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    if dtype == torch.float64:
        return bits.view(np.float64)
    return bits.astype(np.int32).view(np.float32).astype(np.float64)
