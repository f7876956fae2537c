"""One fused kernel per observed GPU tensor (Triton): every element read once, every statistic in one pass.

The torch-ops path (``_accumulate._measure_with_torch``) takes about a dozen launches per tensor:
bucketize writes an int64 per element, an index_add of ones piles global atomics onto the few buckets
where most values sit, and abs, nan_to_num, where and two reductions each pass over the tensor again.
This kernel reads the elements' bit patterns once and, per program (a grid-stride loop over blocks):

- finds each element's bucket of the ``BucketLayout`` from its 13-bit key (``_key_tables``): one
  table read gives the count of boundaries at or below the key's smallest magnitude, which is the
  answer unless a boundary lies inside the key's range; a block holding such an element resolves it
  exactly with a branch-free binary search over the boundaries (a few hundred, cached on chip);
- accumulates the bucket histogram in registers (``tl.histogram``) and adds it to the global counts
  once, at the end of the program, with one atomic add per bucket;
- keeps the largest finite magnitude and the smallest finite non-zero one, as magnitude bits (which
  order like the values), and merges them into the output with one atomic max and one atomic min.

The output is one int64 buffer, zeroed by the caller: the layout's bucket counts, then the device
statistics as the bit patterns of float64 values (``DEVICE_STATS`` order: amax, then minus the smallest
non-zero magnitude, so both merge with an integer atomic on the bits: see ``_merge_extremes``). So a
measured tensor costs two launches, the zeroing and this kernel (plus a copy for a non-contiguous
tensor, and a widening for fp8). The counts are exact, bit for bit those of the CPU paths: the tests
run this kernel on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``).

Used for CUDA tensors when Triton imports (CUDA builds of torch ship it) and ``MPDIAG_TRITON=0`` is not
set (read at import); elsewhere (no Triton, MPS, ROCm, an older Triton) the torch-ops path measures.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Any

import numpy as np
import torch

from mpdiag.record._key_tables import KeyTables, tables_for

__all__ = ["available", "count", "MIN_TRITON"]

#: The oldest Triton release this kernel is written for (``tl.histogram``, bitcasts, static ranges).
MIN_TRITON = (3, 0)
_ENABLED = os.environ.get("MPDIAG_TRITON", "1") != "0"  # read once, at import
_BLOCK = 1024  # elements per block of the grid-stride loop
_NUM_WARPS = 4
_PROGRAMS_PER_SM = 8  # programs per multiprocessor: enough to hide memory latency, few atomics at the end
_INTERPRETED_PROGRAMS = 3  # under the interpreter: several programs, so that the merge across them is tested
_MAX_PER_PROGRAM = 1 << 30  # elements one program counts in its int32 histogram, with room to spare
_SOURCE_MODULE = "mpdiag.record._triton_source"
_source: Any = None  # that module, once imported (Any: it is typed by nothing mypy reads)
# Source dtypes by the code the kernel branches on at compile time.
_SOURCE_CODE = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


def _triton_version() -> tuple[int, ...] | None:
    try:
        import triton
    except Exception:  # noqa: BLE001 - a broken install (a CUDA-less build, a version clash) is "no Triton"
        return None
    return tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())


@functools.cache
def available() -> bool:
    """Whether Triton is installed, recent enough and not disabled (``MPDIAG_TRITON=0``)."""
    version = _triton_version()
    return _ENABLED and version is not None and version >= MIN_TRITON


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors), as the tests ask for."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernel_source(interpret: bool) -> ModuleType:
    """The module that defines the jitted kernel, decorated for the interpreter or not. Imported on first
    use (``import mpdiag`` never imports Triton), and again when the other setting is asked for, since
    Triton reads ``TRITON_INTERPRET`` when a function is decorated."""
    global _source
    if _source is None or _source.INTERPRETED != interpret:
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            _source = importlib.reload(_source) if _source is not None else importlib.import_module(_SOURCE_MODULE)
        finally:
            if saved is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = saved
    return _source


class _DeviceTables:
    """A layout's key tables on one device, as the kernel reads them."""

    def __init__(self, keys: KeyTables, device: torch.device) -> None:
        wide = keys.source == torch.float64
        entry = keys.scan_from * 2 + keys.holds_boundary
        boundaries = keys.boundaries[: keys.n_boundaries]  # the sentinel stops CPU scans; a search needs none
        self.signed_view = keys.signed_view
        self.keys = torch.from_numpy(entry.astype(np.int32)).to(device)
        self.boundaries = torch.from_numpy(boundaries.astype(np.int64 if wide else np.int32)).to(device)
        self.constants = {
            "SOURCE": _SOURCE_CODE[keys.source],
            "WIDE": wide,
            "SHIFT": keys.shift,
            "MAGNITUDE_MASK": keys.magnitude_mask,
            "INF_BITS": keys.inf_bits,
            "N_BOUNDARIES": keys.n_boundaries,
            "SEARCH_STEPS": int(keys.n_boundaries).bit_length(),  # 2**steps > n_boundaries
            "N_BUCKETS": keys.n_buckets,
            "HIST_BINS": 1 << int(keys.n_buckets).bit_length(),  # a power of two past the last bucket
        }


_TABLES: dict[tuple[object, torch.device], _DeviceTables] = {}


def _tables_on(layout: Any, device: torch.device) -> _DeviceTables:
    tables = _TABLES.get((layout, device))
    if tables is None:
        tables = _TABLES[(layout, device)] = _DeviceTables(tables_for(layout), device)
    return tables


@functools.cache
def _programs_for(device: torch.device) -> int:
    if device.type != "cuda":  # the interpreter, on CPU tensors
        return _INTERPRETED_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count * _PROGRAMS_PER_SM


def count(x: torch.Tensor, layout: Any, amax_at: int, neg_amin_at: int, n_values: int) -> torch.Tensor:
    """The bucket counts and device statistics of ``x`` (non-empty, detached, in ``layout.source``), in
    one int64 buffer on its device: ``layout.n_buckets`` counts, then ``n_values`` float64 bit patterns
    with amax at ``amax_at`` and minus amin_nonzero at ``neg_amin_at`` (the others left zero)."""
    tables = _tables_on(layout, x.device)
    flat = x.contiguous().view(tables.signed_view).reshape(-1)
    n = flat.numel()
    with torch.inference_mode(False):  # a normal tensor: accumulators update it in place outside inference
        out = torch.zeros(layout.n_buckets + n_values, dtype=torch.int64, device=x.device)
    programs = max(min(-(-n // _BLOCK), _programs_for(x.device)), -(-n // _MAX_PER_PROGRAM))
    _kernel_source(interpreted()).count_kernel[(programs,)](
        flat,
        n,
        tables.keys,
        tables.boundaries,
        out,
        **tables.constants,
        AMAX_AT=amax_at,
        NEG_AMIN_AT=neg_amin_at,
        BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
    )
    return out
