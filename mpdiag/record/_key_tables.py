"""Bit-space tables shared by the kernels that count a tensor by the top bits of its elements.

A float's sign and magnitude bits order like the value it encodes, so the bucket of ``BucketLayout``
that an element falls in is decided by how many of the layout's boundary magnitudes, as bit patterns,
are at or below the element's magnitude bits. A key is the sign and the top magnitude bits (13 bits:
the exponent and, for fp32, four mantissa bits): every value of a key falls in one bucket, except in the
few keys whose range holds a boundary (a cast threshold that is not a power of two, inf/NaN, the
source's smallest subnormals). The compiled CPU kernel (``_cpu_kernel``) and the GPU kernel
(``_triton_kernel``) read these tables; each resolves the keys that hold a boundary its own way.
"""

from __future__ import annotations

import numpy as np
import torch

from mpdiag.core.casting import INT_VIEW

__all__ = ["KEY_BITS", "KEY_MASK", "KeyTables", "tables_for"]

KEY_BITS = 13
KEY_MASK = (1 << KEY_BITS) - 1


class KeyTables:
    """Bit-space boundaries of one BucketLayout, per key.

    ``boundaries``: the magnitudes' bit patterns in int64, sorted (the last magnitude is +inf), then
    ``inf_bits + 1`` (a NaN's magnitude, clamped to it, counts one more boundary than inf) and a
    sentinel that stops every scan. The bucket of an element is ``bucket_of[sign, j]`` where j counts
    the boundaries (the first ``n_boundaries``: the sentinel excluded) at or below its magnitude.
    ``scan_from[key]`` is that count for the key's smallest magnitude; ``holds_boundary[key]`` says
    whether a boundary lies inside the key's range, so that larger magnitudes of the key count more.
    """

    def __init__(self, source: torch.dtype, magnitudes: list[float]) -> None:
        width = torch.finfo(source).bits
        self.source = source
        self.signed_view = INT_VIEW[source]
        self.shift = width - KEY_BITS  # the magnitude bits below a key
        self.magnitude_mask = (1 << (width - 1)) - 1
        bits = torch.tensor(magnitudes, dtype=torch.float64).to(source).view(self.signed_view)
        boundaries = bits.to(torch.int64).numpy()  # sorted, the last is +inf
        n_b = len(boundaries)
        self.inf_bits = int(boundaries[-1])
        self.boundaries = np.concatenate([boundaries, [self.inf_bits + 1, np.iinfo(np.int64).max]]).astype(np.int64)
        self.n_boundaries = n_b + 1  # what a magnitude is counted against: the sentinel only stops scans
        # (sign, how many boundaries are <= |x|) -> bucket index of BucketLayout: the positive values
        # from the middle up, the negative ones from the middle down, NaN (either sign) last.
        bucket_of = np.empty((2, n_b + 2), dtype=np.int64)
        bucket_of[0, : n_b + 1] = n_b + np.arange(n_b + 1)
        bucket_of[1, : n_b + 1] = n_b - np.arange(n_b + 1)
        bucket_of[:, n_b + 1] = 2 * n_b + 1
        self.bucket_of = bucket_of
        self.n_buckets = 2 * n_b + 2

        keys = np.arange(1 << KEY_BITS, dtype=np.int64)
        self.key_sign = keys >> (KEY_BITS - 1)
        self.key_first = (keys & (KEY_MASK >> 1)) << self.shift  # smallest magnitude of each key
        last = self.key_first + (1 << self.shift) - 1
        self.scan_from = np.searchsorted(self.boundaries, self.key_first, side="right")
        self.holds_boundary = self.scan_from != np.searchsorted(self.boundaries, last, side="right")


_TABLES: dict[object, KeyTables] = {}


def tables_for(layout) -> KeyTables:  # noqa: ANN001 - a BucketLayout
    tables = _TABLES.get(layout)
    if tables is None:
        tables = _TABLES[layout] = KeyTables(layout.source, layout.magnitudes)
        if tables.n_buckets != layout.n_buckets:  # both count the same boundaries: a mismatch is a bug here
            raise AssertionError(f"key tables give {tables.n_buckets} buckets, the layout {layout.n_buckets}")
    return tables
