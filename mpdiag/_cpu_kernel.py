"""A compiled single-pass kernel for CPU tensors (numba), exact and equivalent to the torch path.

``torch.bucketize`` over ~600 edges costs about 20 ns per element on a CPU core, which makes recording
several times slower than training. This kernel assigns the same buckets from the bit patterns: a
65536-entry table indexed by the sign and the top 15 magnitude bits gives the bucket directly, except
for the few table entries whose range holds a boundary, where a short scan finishes the job. amax and
amin_nonzero come from a second, branch-free loop that compiles to vector instructions. Large tensors
are split across numba's threads.

It is used for CPU tensors when numba is installed (``pip install mpdiag[fast]``) and not disabled with
``MPDIAG_NUMBA=0`` (read at import); GPU tensors always take the torch path, where bucketize is
memory-bound and cheap. The tests check that both paths give identical counts.
"""

from __future__ import annotations

import math
import os
import struct

import numpy as np
import torch

from mpdiag.casting import INT_VIEW

try:  # optional: the torch path is exact too, only slower on CPU
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

_TABLE_BITS = 15
_PARALLEL_FROM = 65536  # below this many elements, threads cost more than they save
_ENABLED = numba is not None and os.environ.get("MPDIAG_NUMBA", "1") != "0"  # read once, at import


def available() -> bool:
    return _ENABLED


class KernelTables:
    """Bit-space boundaries of one BucketLayout, in the form the kernel reads them.

    The kernel reads the signed integer view of the floats and works in int64: the magnitude is the
    bits below the sign, and magnitudes order like the floats they encode. ``direct`` maps (sign, top
    15 magnitude bits) straight to a bucket when no boundary falls inside that key's range; for the few
    keys that hold one it stores ``-(boundaries below the key) - 1`` and the kernel scans from there.
    """

    def __init__(self, source: torch.dtype, magnitudes: list[float]) -> None:
        width = torch.finfo(source).bits
        self.source = source
        self.signed_view = INT_VIEW[source]
        self.magnitude_mask = (1 << (width - 1)) - 1
        self.shift = width - 1 - _TABLE_BITS
        bits = torch.tensor(magnitudes, dtype=torch.float64).to(source).view(self.signed_view)
        boundaries = bits.to(torch.int64).numpy()  # sorted, the last is +inf
        n_b = len(boundaries)
        self.inf_bits = int(boundaries[-1])
        # One more boundary just past inf puts NaNs at position n_b + 1; the sentinel stops every scan.
        self.boundaries = np.concatenate([boundaries, [self.inf_bits + 1, np.iinfo(np.int64).max]]).astype(np.int64)
        # (sign, how many boundaries are <= |x|) -> bucket index of BucketLayout.
        self.bucket_of = np.empty((2, n_b + 2), dtype=np.int64)
        self.bucket_of[0, : n_b + 1] = n_b + np.arange(n_b + 1)
        self.bucket_of[1, : n_b + 1] = n_b - np.arange(n_b + 1)
        self.bucket_of[:, n_b + 1] = 2 * n_b + 1
        self.n_buckets = 2 * n_b + 2
        keys = np.arange(1 << _TABLE_BITS, dtype=np.int64)
        below_start = np.searchsorted(self.boundaries, keys << self.shift, side="right")
        below_end = np.searchsorted(self.boundaries, ((keys + 1) << self.shift) - 1, side="right")
        uniform = below_start == below_end
        self.direct = np.concatenate([
            np.where(uniform, self.bucket_of[sign, np.minimum(below_start, n_b + 1)], -below_start - 1)
            for sign in (0, 1)
        ]).astype(np.int64)
        self.stride = n_b + 2
        self.bucket_flat = self.bucket_of.reshape(-1)
        self.to_float = _bits_to_float(source)


if numba is not None:

    @numba.njit(cache=True, nogil=True)
    def _histogram(bits, shift, magnitude_mask, direct, boundaries, bucket_of, stride, counts):
        """Add each element's bucket to counts."""
        for i in range(bits.shape[0]):
            b = np.int64(bits[i])
            k = direct[(b >> shift) & 0xFFFF]  # the sign and the top 15 magnitude bits
            if k < 0:  # a boundary lies inside this key's range: finish with a short scan
                m = b & magnitude_mask
                j = -k - 1
                while boundaries[j] <= m:
                    j += 1
                k = bucket_of[np.int64(b < 0) * stride + j]
            counts[k] += 1

    @numba.njit(cache=True, nogil=True)
    def _extremes(bits, magnitude_mask, inf_bits, out):
        """out = [max finite magnitude, min finite non-zero magnitude] in bits, merged with out's values.

        Branch-free, in its own loop, so that it compiles to vector instructions.
        """
        hi = out[0]
        lo = out[1]
        for i in range(bits.shape[0]):
            m = bits[i] & magnitude_mask
            hi = max(hi, m if m < inf_bits else 0)
            lo = min(lo, m if (m > 0) & (m < inf_bits) else inf_bits)
        out[0] = hi
        out[1] = lo

    @numba.njit(cache=True, nogil=True)
    def _count(bits, shift, magnitude_mask, inf_bits, direct, boundaries, bucket_of, stride, counts, extremes):
        _histogram(bits, shift, magnitude_mask, direct, boundaries, bucket_of, stride, counts)
        _extremes(bits, magnitude_mask, inf_bits, extremes)

    @numba.njit(cache=True, parallel=True)
    def _count_parallel(bits, shift, magnitude_mask, inf_bits, direct, boundaries, bucket_of, stride, counts,
                        extremes, n_chunks):
        size = (bits.shape[0] + n_chunks - 1) // n_chunks
        local_counts = np.zeros((n_chunks, counts.shape[0]), dtype=np.int64)
        local_ext = np.empty((n_chunks, 2), dtype=np.int64)
        for c in numba.prange(n_chunks):
            local_ext[c, 0] = extremes[0]
            local_ext[c, 1] = extremes[1]
            _count(bits[c * size:(c + 1) * size], shift, magnitude_mask, inf_bits, direct, boundaries, bucket_of,
                   stride, local_counts[c], local_ext[c])
        for c in range(n_chunks):
            counts += local_counts[c]
            extremes[0] = max(extremes[0], local_ext[c, 0])
            extremes[1] = min(extremes[1], local_ext[c, 1])


_TABLES: dict[object, KernelTables] = {}


def tables_for(layout) -> KernelTables:  # noqa: ANN001 - a BucketLayout
    tables = _TABLES.get(layout)
    if tables is None:
        tables = _TABLES[layout] = KernelTables(layout.source, layout.magnitudes)
    return tables


def count_into(x: torch.Tensor, layout, counts: np.ndarray, ext: np.ndarray) -> None:  # noqa: ANN001
    """Add the bucket counts of CPU tensor ``x`` (already in ``layout.source``) to ``counts`` and set
    ``ext`` to [amax, -amin_nonzero] of its finite values ([0, -inf] when there are none)."""
    t = tables_for(layout)
    bits = x.contiguous().view(t.signed_view).numpy().reshape(-1)
    extremes = np.array([0, t.inf_bits], dtype=np.int64)
    args = (bits, t.shift, t.magnitude_mask, t.inf_bits, t.direct, t.boundaries, t.bucket_flat, t.stride, counts,
            extremes)
    threads = numba.get_num_threads() if bits.shape[0] >= _PARALLEL_FROM else 1
    if threads > 1:
        _count_parallel(*args, threads)
    else:
        _count(*args)
    hi, lo = int(extremes[0]), int(extremes[1])
    ext[0] = t.to_float(hi)
    ext[1] = -t.to_float(lo) if lo < t.inf_bits else -math.inf


def _bits_to_float(source: torch.dtype):  # noqa: ANN202
    """A function from a magnitude's bit pattern (a Python int) to its float value, for ``source``."""
    if source is torch.bfloat16:  # bf16 is the top half of an fp32
        fp32 = _bits_to_float(torch.float32)
        return lambda bits: fp32(bits << 16)
    int_code, float_code = {torch.float64: ("<q", "<d"), torch.float32: ("<i", "<f"),
                            torch.float16: ("<h", "<e")}[source]
    pack, unpack = struct.Struct(int_code).pack, struct.Struct(float_code).unpack
    return lambda bits: unpack(pack(bits))[0]
