"""A torch-only CPU counter built on the numba kernel's idea, to decide with figures whether numba earns its place.

``count_into`` has the signature and the results of ``mpdiag.record._cpu_kernel.count_into``: the same
13-bit keys (sign and top magnitude bits) counted with ``torch.bincount``, the elements of keys that hold
a boundary (and the tiny magnitudes that share the zero key) given their exact bucket with
``torch.searchsorted``, and the extremes reduced from the magnitude bits. Each step is a torch op over the
whole tensor (shift, mask, bincount, magnitude, two reductions, the gather that finds the boundary keys'
elements): about eight passes where the kernel makes two. ``check`` compares it with the kernel on a
tensor, so a benchmark never times a counter that is wrong.
"""

from __future__ import annotations

import numpy as np
import torch

from mpdiag.record._cpu_kernel import count_into as kernel_count_into  # bound now: benchmarks swap the module's
from mpdiag.record._cpu_kernel import tables_for
from mpdiag.record._key_tables import KEY_BITS, KEY_MASK

__all__ = ["check", "count_into"]

_TORCH_TABLES: dict[object, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _torch_tables(layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001 - a BucketLayout
    """The kernel's tables as tensors: which keys need an exact look, the boundaries, bucket per boundary."""
    tables = _TORCH_TABLES.get(layout)
    if tables is None:
        t = tables_for(layout)
        tables = _TORCH_TABLES[layout] = (
            torch.from_numpy(t.special.astype(bool)),
            torch.from_numpy(t.boundaries.astype(np.int64)),
            torch.from_numpy(t.bucket_flat.astype(np.int64)),
        )
    return tables


def count_into(x: torch.Tensor, layout, counts: np.ndarray) -> dict[str, float]:  # noqa: ANN001
    """What ``_cpu_kernel.count_into`` does, with torch ops only."""
    t = tables_for(layout)
    special, boundaries, bucket_of = _torch_tables(layout)
    bits = x.contiguous().view(t.signed_view).reshape(-1)
    keys = (bits >> (bits.element_size() * 8 - KEY_BITS)) & KEY_MASK
    if keys.dtype == torch.int16:  # index tensors must be int32 or wider
        keys = keys.int()
    key_counts = torch.bincount(keys, minlength=KEY_MASK + 1)
    magnitude = bits & t.magnitude_mask
    finite = magnitude < t.inf_bits
    hi = int(torch.where(finite, magnitude, 0).amax())
    lo = int(torch.where(finite & (magnitude > 0), magnitude, t.inf_bits).amin())
    exact = special[keys]
    if lo < t.tiny_below:  # magnitudes that share the zero key with 0 (as in the kernel)
        exact |= (magnitude > 0) & (magnitude < t.tiny_below)
    if bool(exact.any()):
        b, m = bits[exact].long(), magnitude[exact].long()
        key_counts -= torch.bincount(keys[exact], minlength=KEY_MASK + 1)
        j = torch.searchsorted(boundaries, m.clamp(max=int(boundaries[-2])), right=True)
        bucket = bucket_of[(b < 0).long() * t.stride + j]
        counts += torch.bincount(bucket, minlength=len(counts)).numpy()
    np.add.at(counts, t.key_bucket, key_counts.numpy())
    return {"amax": t.to_float(hi), "amin_nonzero": t.to_float(lo)}


def check(x: torch.Tensor, layout) -> None:  # noqa: ANN001
    """Raise unless ``count_into`` and the numba kernel give the same counts and extremes for ``x``."""
    mine, theirs = np.zeros(layout.n_buckets, np.int64), np.zeros(layout.n_buckets, np.int64)
    a, b = count_into(x, layout, mine), kernel_count_into(x, layout, theirs)
    if not (np.array_equal(mine, theirs) and a == b):
        raise AssertionError(f"the torch counter disagrees with the kernel on a {x.dtype} tensor: {a} vs {b}")
