"""Bucket layouts: one sorted edge list per source dtype that makes every count a single histogram.

Every boundary a TensorStats needs, for one source dtype and a set of formats, is a magnitude where
something changes: a power of two (the log2 histogram), a cast threshold of a tracked format (from
``casting.thresholds``, so exact), the smallest positive value (zero vs non-zero) and infinity. Merged
into one signed, sorted edge list, ``torch.bucketize`` gives each element one bucket index, and a
single histogram of bucket indices holds everything; the host decodes it with tables built here.

Buckets follow ``bucketize(right=False)``: bucket i holds ``edges[i-1] < x <= edges[i]``. Edge 0 is
-inf, so bucket 0 is exactly -inf; the last edge is +inf; NaN lands one past it, in its own bucket.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from mpdiag.core import formats as _formats
from mpdiag.core.casting import INT_VIEW, Category, source_dtype, thresholds
from mpdiag.core.stats import HIST_EXPONENTS

#: The statistics a bucket histogram decodes to (``decode_many``): those declared ``Source.BUCKETS``.
DECODED = ("numel", "zeros", "posinf", "neginf", "nans", "hist", "casts")

# Bucket kinds (host-side decode only).
ZERO, FINITE, POSINF, NEGINF, NAN = range(5)


def _neighbour(value: float, dtype: torch.dtype, step: int) -> float:
    """The positive value ``step`` ulps away from the positive ``value`` in ``dtype``."""
    bits = torch.tensor([value], dtype=dtype).view(INT_VIEW[dtype]) + step
    return float(bits.view(dtype).to(torch.float64))


def _representable(value: float, dtype: torch.dtype) -> bool:
    return float(torch.tensor([value], dtype=dtype).to(torch.float64)) == value


class BucketLayout:
    """Edges for one source dtype and format set, and the tables that decode bucket counts."""

    def __init__(self, source: torch.dtype, format_names: tuple[str, ...]) -> None:
        self.source = source
        self.format_names = format_names
        magnitudes = self._boundary_magnitudes()
        self.magnitudes = magnitudes  # sorted: smallest positive value, ..., inf
        self.edges = (
            [-m for m in reversed(magnitudes)]
            + [_neighbour(m, source, -1) if math.isfinite(m) else float(torch.finfo(source).max) for m in magnitudes]
            + [math.inf]
        )
        self.n_buckets = len(self.edges) + 1
        # (nan, +inf, -inf) buckets: NaN lands past the last edge, +inf on the last, -inf on the first
        self.nonfinite_buckets = (self.n_buckets - 1, self.n_buckets - 2, 0)
        lower = list(reversed(magnitudes)) + [0.0] + magnitudes[:-1] + [math.inf, math.nan]
        signs = [-1] * len(magnitudes) + [0] + [1] * len(magnitudes) + [0]
        self._build_tables(lower, signs)
        self._device_edges: dict[torch.device, torch.Tensor] = {}

    def _boundary_magnitudes(self) -> list[float]:
        info = torch.finfo(self.source)
        smallest = float(info.smallest_normal) * float(info.eps)
        found = {smallest, math.inf}
        for k in HIST_EXPONENTS:
            power = math.ldexp(1.0, int(k))
            if smallest <= power <= info.max and _representable(power, self.source):
                found.add(power)
        for name in self.format_names:
            t = thresholds(_formats.get(name), self.source)
            found.update(v for v in (t.nonzero_from, t.normal_from, t.overflow_from) if math.isfinite(v))
        return sorted(found)

    def _build_tables(self, lower: list[float], signs: list[int]) -> None:
        """For each bucket: its kind, histogram bin and the cast category of each format."""
        n = self.n_buckets
        self.kind = np.full(n, FINITE, dtype=np.int8)
        self.hist_bin = np.full(n, -1, dtype=np.int64)
        self.category = np.zeros((len(self.format_names), n), dtype=np.int8)
        fmt_thresholds = [thresholds(_formats.get(name), self.source) for name in self.format_names]
        for i, (mag, sign) in enumerate(zip(lower, signs)):
            if math.isnan(mag):
                self.kind[i] = NAN
            elif math.isinf(mag):
                self.kind[i] = NEGINF if sign < 0 else POSINF
            elif mag == 0:
                self.kind[i] = ZERO
            else:
                exponent = min(max(math.frexp(mag)[1] - 1, int(HIST_EXPONENTS[0])), int(HIST_EXPONENTS[-1]))
                self.hist_bin[i] = exponent - int(HIST_EXPONENTS[0])
                for f, t in enumerate(fmt_thresholds):
                    self.category[f, i] = _category(mag, t)

    def edges_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._device_edges:
            self._device_edges[device] = torch.tensor(self.edges, dtype=torch.float64).to(self.source).to(device)
        return self._device_edges[device]

    @functools.cached_property
    def _column_of_bucket(self) -> np.ndarray:
        """For each bucket, the TensorStats field column its count adds to, one row per field group.

        Groups: the kind of value (numel is the total), the histogram bin, and each format's cast
        category. -1 where a bucket adds to no column of the group (NORMAL casts, say).
        """
        groups = [
            np.where(
                np.isin(self.kind, (ZERO, NAN, POSINF, NEGINF)),
                np.searchsorted([ZERO, POSINF, NEGINF, NAN], self.kind).clip(0, 3),
                -1,
            )
        ]
        groups.append(np.where(self.kind == FINITE, self.hist_bin, -1))
        for f in range(len(self.format_names)):
            column = np.full(self.n_buckets, -1)
            for c, category in enumerate((Category.UNDERFLOW, Category.SUBNORMAL, Category.OVERFLOW)):
                column[self.category[f] == category] = c
            groups.append(column)
        return np.stack(groups)

    @functools.cached_property
    def _field_columns(self) -> tuple[np.ndarray, int]:
        """All groups side by side in one row of fields (kinds, histogram, casts of each format): for
        each bucket, the column of that row it adds to in each group (-1: none), and the row's width."""
        widths = [4, len(HIST_EXPONENTS)] + [3] * len(self.format_names)
        offsets = np.cumsum([0] + widths[:-1])[:, None]
        by_group = self._column_of_bucket
        return np.where(by_group >= 0, by_group + offsets, -1).T.copy(), int(sum(widths))

    def decode_many(self, counts: np.ndarray) -> list[dict[str, object]]:
        """Turn bucket histograms (one per row) into TensorStats fields.

        Exact integer sums with numpy over the non-zero counts only (a step's histograms are sparse; no
        BLAS either: its worker threads would compete with training for the CPU long after the call
        returns). The arrays returned are read-only views of one block, so TensorStats keeps them
        without a copy.
        """
        counts = np.asarray(counts, dtype=np.int64)
        columns, width = self._field_columns
        rows, buckets = np.nonzero(counts)
        targets = columns[buckets]  # (non-zero counts, groups)
        used = targets >= 0
        flat = np.zeros(len(counts) * width, dtype=np.int64)
        np.add.at(
            flat,
            (rows[:, None] * width + targets)[used],
            np.broadcast_to(counts[rows, buckets][:, None], targets.shape)[used],
        )
        fields = flat.reshape(len(counts), width)
        fields.setflags(write=False)
        n_hist = len(HIST_EXPONENTS)
        kinds, hist = fields[:, :4], fields[:, 4 : 4 + n_hist]
        casts = fields[:, 4 + n_hist :].reshape(len(counts), len(self.format_names), 3)
        numel = counts.sum(axis=1).tolist()
        zeros, posinf, neginf, nans = kinds.T.tolist()
        decoded: dict[str, Any] = {
            "numel": numel,
            "zeros": zeros,
            "posinf": posinf,
            "neginf": neginf,
            "nans": nans,
            "hist": hist,
            "casts": casts,
        }
        return [{name: decoded[name][i] for name in DECODED} for i in range(len(counts))]


def _category(magnitude: float, t) -> Category:
    if magnitude < t.nonzero_from:
        return Category.UNDERFLOW
    if magnitude < t.normal_from:
        return Category.SUBNORMAL
    if magnitude >= t.overflow_from:
        return Category.OVERFLOW
    return Category.NORMAL


@functools.cache
def layout_for(dtype: torch.dtype, format_names: tuple[str, ...]) -> BucketLayout:
    return BucketLayout(source_dtype(dtype), format_names)
