"""The Triton source of the GPU kernel (see ``_triton_kernel``, which imports this module on first use).

A module of its own: Triton resolves the functions a kernel calls among its module's globals, and decides
whether a function runs in its interpreter when it is decorated, so this module is imported only where
Triton is wanted (never by ``import mpdiag``) and re-imported when the interpreter setting changes.
"""

# ruff: noqa: N803 - Triton's compile-time constants are upper case

# No ``from __future__ import annotations``: Triton reads the ``tl.constexpr`` annotations as objects.
import os

import triton
import triton.language as tl

from mpdiag.record import _key_tables

KEY_MASK = tl.constexpr(_key_tables.KEY_MASK)  # a kernel reads only constexpr globals

#: Whether the functions below were decorated for Triton's interpreter (on CPU tensors).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def magnitude_to_f64(m, SOURCE: tl.constexpr):
    """A magnitude's bit pattern (int32, or int64 for fp64) -> its value as float64."""
    if SOURCE == 0:
        value = m.to(tl.float64, bitcast=True)
    elif SOURCE == 1:
        value = m.to(tl.float32, bitcast=True).to(tl.float64)
    elif SOURCE == 2:
        value = m.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float64)
    else:  # bf16 is the top half of an fp32 (exact for its subnormals too, which a bf16 conversion may flush)
        value = (m << 16).to(tl.float32, bitcast=True).to(tl.float64)
    return value


@triton.jit
def count_kernel(
    bits_ptr,
    n,
    key_ptr,
    boundaries_ptr,
    out_ptr,
    SOURCE: tl.constexpr,
    WIDE: tl.constexpr,
    SHIFT: tl.constexpr,
    MAGNITUDE_MASK: tl.constexpr,
    INF_BITS: tl.constexpr,
    N_BOUNDARIES: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    N_BUCKETS: tl.constexpr,
    HIST_BINS: tl.constexpr,
    AMAX_AT: tl.constexpr,
    NEG_AMIN_AT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    lane = tl.arange(0, BLOCK)
    hist = tl.zeros([HIST_BINS], dtype=tl.int32)
    if WIDE:  # fp64 bit patterns need int64 arithmetic; the others fit int32
        hi = tl.zeros([BLOCK], dtype=tl.int64)
        lo = tl.full([BLOCK], INF_BITS, dtype=tl.int64)
    else:
        hi = tl.zeros([BLOCK], dtype=tl.int32)
        lo = tl.full([BLOCK], INF_BITS, dtype=tl.int32)
    for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
        offsets = start + lane
        inside = offsets < n
        b = tl.load(bits_ptr + offsets, mask=inside, other=0)
        b = b.to(tl.int64) if WIDE else b.to(tl.int32)  # sign-extends 16-bit patterns
        m = b & MAGNITUDE_MASK
        entry = tl.load(key_ptr + ((b >> SHIFT) & KEY_MASK))  # scan_from * 2 + holds_boundary
        count = entry >> 1
        # Past the key's smallest magnitude in a key that holds a boundary: count the boundaries.
        search = inside & ((entry & 1) != 0) & ((m & ((1 << SHIFT) - 1)) != 0)
        if tl.max(search.to(tl.int32), axis=0) > 0:
            clamped = tl.minimum(m, INF_BITS + 1)  # every NaN counts as the first NaN pattern
            found = tl.zeros([BLOCK], dtype=tl.int32)
            for s in tl.static_range(SEARCH_STEPS):
                candidate = found + (1 << (SEARCH_STEPS - 1 - s))
                valid = search & (candidate <= N_BOUNDARIES)
                boundary = tl.load(boundaries_ptr + candidate - 1, mask=valid, other=0)
                found = tl.where(valid & (boundary <= clamped), candidate, found)
            count = tl.where(search, found, count)
        # bucket_of in _key_tables: positives up from the middle, negatives down, NaN last
        middle = N_BOUNDARIES - 1
        bucket = tl.where(count == N_BOUNDARIES, N_BUCKETS - 1, tl.where(b < 0, middle - count, middle + count))
        hist += tl.histogram(tl.where(inside, bucket, HIST_BINS - 1), HIST_BINS)  # a spare bin past the last
        finite = inside & (m < INF_BITS)
        hi = tl.maximum(hi, tl.where(finite, m, 0))
        lo = tl.minimum(lo, tl.where(finite & (m > 0), m, INF_BITS))
    bins = tl.arange(0, HIST_BINS)
    tl.atomic_add(out_ptr + bins, hist.to(tl.int64), mask=bins < N_BUCKETS)
    amax = magnitude_to_f64(tl.max(hi, axis=0), SOURCE)
    neg_amin = -magnitude_to_f64(tl.min(lo, axis=0), SOURCE)  # -inf when there is no non-zero value
    tl.atomic_max(out_ptr + N_BUCKETS + AMAX_AT, amax.to(tl.int64, bitcast=True))
    tl.atomic_min(out_ptr + N_BUCKETS + NEG_AMIN_AT, neg_amin.to(tl.int64, bitcast=True))
