"""TensorStats: what one observed site held, as plain host data that merges exactly.

A TensorStats summarises every floating tensor observed at one site (a module's activations, say) over
one or more calls and steps: counts of zeros and non-finite values, the largest and smallest non-zero
finite magnitudes, a histogram of log2|x| at power-of-two resolution over the whole fp32 range, and for
each tracked format exact counts of the values a cast would flush to zero, make subnormal, or overflow.

Merging is exact, associative and commutative: sums of counts, max of amax, min of amin_nonzero.

Examples:
    >>> import torch, mpdiag
    >>> s = mpdiag.tensor_stats(torch.tensor([0.0, 1e-8, 3.0, 7e4, float("inf")]), formats=("fp16", "bf16"))
    >>> s.numel, s.zeros, s.posinf, s.amax
    (5, 1, 1, 70000.0)
    >>> s.underflow("fp16"), s.overflow("fp16"), s.overflow("bf16")
    (1, 1, 0)
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from mpdiag.core import formats as _formats
from mpdiag.core.errors import MpdiagError
from mpdiag.core.formats import Format

__all__ = [
    "merge_values",
    "TensorStats",
    "HIST_EXPONENTS",
    "DEFAULT_FORMATS",
    "STATS",
    "Stat",
    "Reduce",
    "Source",
    "Storage",
    "format_names",
]

#: Formats tracked unless the caller says otherwise.
DEFAULT_FORMATS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")
#: What a ``formats`` argument takes: one format (a name or alias, a torch dtype, a Format) or several.
FormatSpecs = str | torch.dtype | Format | Iterable[str | torch.dtype | Format]

_FP32 = torch.finfo(torch.float32)
_HIST_LOW = math.frexp(float(_FP32.smallest_normal) * float(_FP32.eps))[1] - 1  # -149: smallest subnormal
_HIST_HIGH = math.frexp(float(_FP32.max))[1] - 1  # 127
#: Histogram bin i counts finite non-zero values with floor(log2|x|) == HIST_EXPONENTS[i].
HIST_EXPONENTS = np.arange(_HIST_LOW, _HIST_HIGH + 1)

# Column order of TensorStats.casts.
_UNDERFLOW, _SUBNORMAL, _OVERFLOW = 0, 1, 2


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only int64 array: shared when ``a`` already is one, else a private copy."""
    a = np.asarray(a, dtype=np.int64)
    if a.flags.writeable:
        a = a.copy()
        a.setflags(write=False)
    return a


def format_names(specs: FormatSpecs) -> tuple[str, ...]:
    """Canonical, de-duplicated names for a user's formats, one or several (validated once, at the API edge).

    Examples:
        >>> format_names("half"), format_names(torch.bfloat16), format_names(["fp16", "e4m3", "float16"])
        (('fp16',), ('bf16',), ('fp16', 'fp8_e4m3'))
    """
    if isinstance(specs, (str, torch.dtype, Format)):  # one format: a string is not its characters
        specs = (specs,)
    names = tuple(dict.fromkeys(_formats.get(s).name for s in specs))
    if not names:
        raise MpdiagError("expected at least one format to track, got none")
    return names


class Reduce(str, enum.Enum):
    """How a statistic combines over tensors, calls, steps and ranks (exactly, in any order)."""

    SUM = "sum"  # exact for counts; a float sum would merge only up to rounding (not associatively)
    MAX = "max"
    MIN = "min"
    UNION = "union"  # of a set of names


class Source(str, enum.Enum):
    """Where the recorder gets a statistic from (``mpdiag.record._accumulate``)."""

    BUCKETS = "buckets"  # decoded from the tensor's bucket histogram (``mpdiag.record._layout``)
    DEVICE = "device"  # a reduction of the tensor that the kernels compute by the statistic's name
    HOST = "host"  # counted on the host as tensors are observed


class Storage(str, enum.Enum):
    """How a statistic is stored in a run file (``mpdiag.io.runfile``)."""

    INTEGER = "integer"
    REAL = "real"  # NaN (which no statistic over finite values is) is stored as NULL, read back as the default
    NAMES = "names"  # a set of names, comma-joined
    SPAN = "span"  # a histogram: its first non-zero bin and the packed bins up to its last
    ARRAY = "array"  # a packed int64 array of the statistic's shape


class Rescale(str, enum.Enum):
    """What a statistic becomes when every observed value is divided by a power of two (the loss scale),
    so that analyses can tell true gradients from the scaled ones that were recorded."""

    KEEP = "keep"  # counts of elements, dtypes, and the casts the recorded tensors themselves went through
    DIVIDE = "divide"  # a magnitude: divided by the same power of two (exact)
    SHIFT = "shift"  # the log2 histogram: bins move down by the exponent


@dataclass(frozen=True)
class Stat:
    """The declaration of one statistic of a TensorStats: everything else derives from it (merging,
    equality, the recorder's device state and its one transfer per step, the all-reduce across ranks,
    the run-file columns). Declared on the TensorStats field with ``_stat(...)``."""

    name: str
    reduce: Reduce
    source: Source
    storage: Storage
    rescale: Rescale = Rescale.KEEP


def _stat(
    default: Any = None,
    *,
    reduce: Reduce,
    source: Source,
    storage: Storage,
    rescale: Rescale = Rescale.KEEP,
    factory: Any = None,
) -> Any:
    """A TensorStats field with its declaration (the name is filled in from the field)."""
    metadata = {"stat": (reduce, source, storage, rescale)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _count(source: Source = Source.BUCKETS) -> Any:
    return _stat(0, reduce=Reduce.SUM, source=source, storage=Storage.INTEGER)


def _empty_hist() -> np.ndarray:
    return _frozen(np.zeros(len(HIST_EXPONENTS)))


@dataclass(frozen=True, eq=False)
class TensorStats:
    """Statistics of the floating tensors observed at one site.

    Attributes:
        formats: names of the tracked formats, the order of the rows of ``casts``.
        numel: elements observed. zeros, nans, posinf, neginf: elements that were exactly so.
        amax: largest finite |x| (0.0 when no finite value was seen).
        amin_nonzero: smallest finite non-zero |x| (inf when none was seen).
        hist: counts of finite non-zero values per floor(log2|x|), bins ``HIST_EXPONENTS``; fp64 values
            beyond the fp32 range are counted in the end bins.
        casts: int64 array (formats x 3): underflow, subnormal and overflow counts per format.
        dtypes: names of the dtypes observed. calls: tensors observed.

    Each statistic's field declares how it merges, where the recorder gets it and how it is stored
    (``STATS``); a new statistic is a new field here and the kernel that computes it.
    """

    formats: tuple[str, ...]
    numel: int = _count()
    zeros: int = _count()
    nans: int = _count()
    posinf: int = _count()
    neginf: int = _count()
    amax: float = _stat(0.0, reduce=Reduce.MAX, source=Source.DEVICE, storage=Storage.REAL, rescale=Rescale.DIVIDE)
    amin_nonzero: float = _stat(
        math.inf, reduce=Reduce.MIN, source=Source.DEVICE, storage=Storage.REAL, rescale=Rescale.DIVIDE
    )
    hist: np.ndarray = _stat(
        reduce=Reduce.SUM, source=Source.BUCKETS, storage=Storage.SPAN, rescale=Rescale.SHIFT, factory=_empty_hist
    )
    # the default None stands for zeros (one row per format, which a default cannot know): always an array once built
    casts: np.ndarray = _stat(None, reduce=Reduce.SUM, source=Source.BUCKETS, storage=Storage.ARRAY)
    dtypes: frozenset[str] = _stat(frozenset(), reduce=Reduce.UNION, source=Source.HOST, storage=Storage.NAMES)
    calls: int = _count(Source.HOST)

    def __post_init__(self) -> None:
        casts = np.zeros((len(self.formats), 3)) if self.casts is None else self.casts
        object.__setattr__(self, "hist", _frozen(self.hist))
        object.__setattr__(self, "casts", _frozen(casts))
        if self.hist.shape != HIST_EXPONENTS.shape or self.casts.shape != (len(self.formats), 3):
            raise MpdiagError(
                f"TensorStats arrays have the wrong shape: hist {self.hist.shape} (expected "
                f"{HIST_EXPONENTS.shape}), casts {self.casts.shape} (expected ({len(self.formats)}, 3))"
            )

    @classmethod
    def empty(cls, formats: FormatSpecs = DEFAULT_FORMATS) -> TensorStats:
        return cls(formats=format_names(formats))

    # -- per-format counts ------------------------------------------------------------------------
    def _row(self, fmt: str | torch.dtype | Format) -> np.ndarray:
        name = _formats.get(fmt).name
        if name not in self.formats:
            raise MpdiagError(f"format {name!r} was not tracked; tracked formats are {', '.join(self.formats)}")
        return self.casts[self.formats.index(name)]

    def underflow(self, fmt: str | torch.dtype | Format) -> int:
        """Non-zero finite values that casting to ``fmt`` would flush to zero."""
        return int(self._row(fmt)[_UNDERFLOW])

    def subnormal(self, fmt: str | torch.dtype | Format) -> int:
        """Values that casting to ``fmt`` would leave subnormal (non-zero, below its min normal)."""
        return int(self._row(fmt)[_SUBNORMAL])

    def overflow(self, fmt: str | torch.dtype | Format) -> int:
        """Finite values at or past ``fmt``'s overflow threshold (inf, NaN or saturated after a cast)."""
        return int(self._row(fmt)[_OVERFLOW])

    def normal(self, fmt: str | torch.dtype | Format) -> int:
        """Finite non-zero values that stay normal after casting to ``fmt``."""
        return self.finite_nonzero - int(self._row(fmt).sum())

    @property
    def finite(self) -> int:
        return self.numel - self.nans - self.posinf - self.neginf

    @property
    def finite_nonzero(self) -> int:
        return self.finite - self.zeros

    @property
    def nonfinite(self) -> int:
        return self.nans + self.posinf + self.neginf

    # -- merging ----------------------------------------------------------------------------------
    def merge(self, other: TensorStats) -> TensorStats:
        """Statistics of everything both saw. Exact, associative and commutative."""
        return TensorStats.merge_all((self, other))

    __add__ = merge

    @staticmethod
    def merge_all(items: Iterable[TensorStats], formats: Sequence[str] | None = None) -> TensorStats:
        """Statistics of everything ``items`` saw (the empty statistics of ``formats`` when there are none),
        in one vectorised sum: a site over hundreds of steps merges in one pass, not a chain of merges."""
        items = list(items)
        if not items:
            if formats is None:
                raise MpdiagError("merge_all needs at least one TensorStats or the formats of an empty one")
            return TensorStats.empty(formats)
        if len(items) == 1:
            return items[0]
        first = items[0]
        other = next((s.formats for s in items if s.formats != first.formats), None)
        if other is not None:
            raise MpdiagError(f"cannot merge stats of formats {first.formats} with stats of formats {other}")
        return TensorStats(
            first.formats, **{s.name: merge_values(s.reduce, [getattr(i, s.name) for i in items]) for s in STATS}
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorStats):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[Any, ...]:
        values = (getattr(self, s.name) for s in STATS)
        return (self.formats, *(v.tobytes() if isinstance(v, np.ndarray) else v for v in values))

    def as_dict(self) -> dict[str, Any]:
        """A flat dict of plain Python values: counts, extremes and per-format cast counts."""
        row: dict[str, Any] = {}
        for s in STATS:
            value = getattr(self, s.name)
            if s.storage in (Storage.INTEGER, Storage.REAL):
                row[s.name] = value
            elif s.storage is Storage.NAMES:
                row[s.name] = ",".join(sorted(value))
        for name in self.formats:
            row[f"{name}_underflow"] = self.underflow(name)
            row[f"{name}_subnormal"] = self.subnormal(name)
            row[f"{name}_overflow"] = self.overflow(name)
        return row

    def __repr__(self) -> str:
        scalars = ", ".join(
            f"{s.name}={getattr(self, s.name):.6g}"
            if s.storage is Storage.REAL
            else f"{s.name}={getattr(self, s.name)}"
            for s in STATS
            if s.storage is Storage.INTEGER or s.storage is Storage.REAL
        )
        casts = ", ".join(f"{n}: u{r[0]}/s{r[1]}/o{r[2]}" for n, r in zip(self.formats, self.casts))
        return f"TensorStats({scalars}, casts={{{casts}}})"

    def rescaled(self, shift: int) -> TensorStats:
        """The statistics of the same values divided by 2**shift (a loss scale undone), each as declared
        (``Rescale``): exact, since a power of two only moves exponents. Bins pushed past either end of
        fp32's range collect in the end bins."""
        if shift == 0:
            return self
        values = {}
        for s in STATS:
            value = getattr(self, s.name)
            if s.rescale is Rescale.DIVIDE:
                value = value / 2.0**shift
            elif s.rescale is Rescale.SHIFT:
                moved = np.zeros_like(value)
                np.add.at(moved, np.clip(np.arange(len(value)) - shift, 0, len(value) - 1), value)
                value = moved
            values[s.name] = value
        return TensorStats(self.formats, **values)


#: The declaration of every statistic, in field order.
STATS: tuple[Stat, ...] = tuple(Stat(f.name, *f.metadata["stat"]) for f in fields(TensorStats) if "stat" in f.metadata)

_MERGE: dict[Reduce, Callable[[list[Any]], Any]] = {
    Reduce.SUM: lambda values: np.sum(values, axis=0) if isinstance(values[0], np.ndarray) else sum(values),
    Reduce.MAX: max,
    Reduce.MIN: min,
    Reduce.UNION: lambda values: frozenset().union(*values),
}


def merge_values(reduce: Reduce, values: list[Any]) -> Any:
    """Values of one statistic (of several tensors, steps or ranks) merged by ``reduce``: sums (of
    numbers or arrays), the max, the min, or the union of sets of names (any iterables)."""
    return _MERGE[reduce](values)
