"""A compiled kernel for CPU tensors (numba), exact and equivalent to the torch path.

``torch.bucketize`` over ~600 edges costs about 20 ns per element on a CPU core, which makes recording
several times slower than training. This kernel assigns the same buckets from the bit patterns. A key
is the sign and the top magnitude bits (13 bits: the exponent and, for fp32, four mantissa bits); every
value of a key falls in one bucket, except in the few keys whose range holds a boundary (a cast
threshold that is not a power of two, inf/NaN, the source's own subnormals).

- Large tensors: a histogram of keys, folded into buckets at the end. The count's address depends only
  on the element, not on a table read first, so the loop runs near the speed of a plain histogram
  (measured on a 2-core x86 machine: 0.75 ns per element for activations, with zeros among them or not,
  0.9 for small gradients; the table-indexed loop this replaced took 1.1, 1.9 with zeros). Elements of
  keys that hold a boundary are noted and finished with a short scan after each chunk, out of the hot
  loop. Zeros stay in their key (its smallest value is 0); the rare tiny subnormals that share it are
  moved out afterwards, when the smallest magnitude shows there are any.
- Small tensors (where clearing and folding 8,192 keys would cost more than the tensor): each element's
  bucket directly, from its key's first bucket and the same short scan.
- The extremes (amax, smallest non-zero magnitude) in a branch-free loop that compiles to vector
  instructions. Large tensors are split across numba's threads, once that kernel has compiled in the
  background (``compile_wanted``).

Loop bounds that depend on the source width are compile-time constants (``_key_shift``): a shift by a
run-time amount made the hot loop half as fast.

It is used for CPU tensors when numba is installed (``pip install mpdiag[fast]``) and not disabled with
``MPDIAG_NUMBA=0`` (read at import); GPU tensors always take the torch path, where bucketize is
memory-bound and cheap. The tests check that both paths give identical counts. The compiled code is
cached in a per-user directory (``_kernel_cache``), so only the first process compiles it.
"""

from __future__ import annotations

import logging
import os
import struct
import threading

import numpy as np
import torch

from mpdiag.record._key_tables import KEY_BITS, KeyTables
from mpdiag.record._key_tables import KEY_MASK as _KEY_MASK
from mpdiag.record._key_tables import tables_for as key_tables_for

try:  # optional: the torch path is exact too, only slower on CPU
    import numba
    from numba.extending import overload

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised where numba is absent
    _HAVE_NUMBA = False  # and ``numba`` undefined: only code that runs when it is installed uses it

_CHUNK = 4096  # elements per pass of the hot loop; its noted exceptions fit a buffer this long
_DIRECT_BELOW = 8192  # fewer elements than this: each element's bucket directly
_PARALLEL_FROM = 65536  # below this many elements, threads cost more than they save
_ENABLED = _HAVE_NUMBA and os.environ.get("MPDIAG_NUMBA", "1") != "0"  # read once, at import

log = logging.getLogger(__name__)


def available() -> bool:
    return _ENABLED


class KernelTables:
    """The key tables of one BucketLayout (``_key_tables``) in the form the compiled kernel reads them.

    The kernel reads the signed integer view of the floats and works in int64. ``key_bucket`` is the
    bucket of each key's smallest magnitude, which holds the whole key unless ``special``: a boundary
    lies inside the key's range, and an element's bucket is found by scanning ``boundaries`` from
    ``scan_from``. The two zero keys are not ``special`` (see the module docstring); magnitudes below
    ``tiny_below`` share them.
    """

    def __init__(self, keys: KeyTables) -> None:
        self.source = keys.source
        self.signed_view = keys.signed_view
        self.magnitude_mask = keys.magnitude_mask
        self.inf_bits = keys.inf_bits
        self.boundaries = keys.boundaries
        self.stride = keys.bucket_of.shape[1]
        self.bucket_flat = keys.bucket_of.reshape(-1)
        self.scan_from = keys.scan_from
        self.key_bucket = keys.bucket_of[keys.key_sign, keys.scan_from]
        self.special = keys.holds_boundary.astype(np.uint8)
        self.special[keys.key_first == 0] = 0
        self.tiny_below = 1 << keys.shift
        self.to_float = _bits_to_float(keys.source)
        self.no_extremes = np.array([0, self.inf_bits], dtype=np.int64)  # [max, min non-zero magnitude]
        # The tables in the order the compiled functions take them.
        self.args = (
            self.special,
            self.scan_from,
            self.key_bucket,
            self.boundaries,
            self.bucket_flat,
            self.stride,
            self.magnitude_mask,
            self.inf_bits,
            self.tiny_below,
        )


if _HAVE_NUMBA:
    # Not numba's cache=True, which writes beside this file, into the installed package.
    try:
        from mpdiag.record._kernel_cache import cached
    except ImportError:  # numba internals the cache relies on moved: compile in each process instead

        def cached(dispatcher):  # noqa: ANN001, ANN202
            return dispatcher

    def _key_shift(bits):  # noqa: ANN001, ANN202 - typed by the overload below
        raise NotImplementedError("only callable from compiled code")

    @overload(_key_shift)
    def _key_shift_constant(bits):  # noqa: ANN001, ANN202
        shift = bits.dtype.bitwidth - KEY_BITS  # a constant of the compiled loop, one per source width
        return lambda bits: shift

    @cached
    @numba.njit(nogil=True)
    def _bucket(b, scan_from, boundaries, bucket_of, stride, magnitude_mask, shift):
        """The bucket of one element (bit pattern ``b``): its key's first boundary, then a short scan."""
        # Every NaN compares as the first NaN pattern, so the scan stops at the sentinel even for an fp64
        # NaN whose magnitude is the sentinel's value.
        m = min(b & magnitude_mask, boundaries[-2])
        j = scan_from[(b >> shift) & _KEY_MASK]
        while boundaries[j] <= m:
            j += 1
        return bucket_of[np.int64(b < 0) * stride + j]

    @cached
    @numba.njit(nogil=True)
    def _extremes(bits, magnitude_mask, inf_bits, out):
        """out = [max finite magnitude, min finite non-zero magnitude] in bits, merged with out's values.

        Branch-free, in its own loop, so that it compiles to vector instructions (each counter added to
        this loop made it markedly slower: the kernel's callers find NaN/inf in the bucket counts).
        """
        hi = out[0]
        lo = out[1]
        for i in range(bits.shape[0]):
            m = bits[i] & magnitude_mask
            hi = max(hi, m if m < inf_bits else 0)
            lo = min(lo, m if (m > 0) & (m < inf_bits) else inf_bits)
        out[0] = hi
        out[1] = lo

    @cached
    @numba.njit(nogil=True)
    def _key_histogram(
        bits, special, scan_from, key_bucket, boundaries, bucket_of, stride, magnitude_mask, inf_bits, counts, extremes
    ):
        shift = _key_shift(bits)
        keys = np.zeros(_KEY_MASK + 1, dtype=np.int64)
        noted = np.empty(_CHUNK, dtype=np.int64)
        n = bits.shape[0]
        for start in range(0, n, _CHUNK):
            # The extremes chunk by chunk, so that the histogram reads the chunk from L1: a tensor larger
            # than the caches is read from memory once, not twice.
            _extremes(bits[start : start + _CHUNK], magnitude_mask, inf_bits, extremes)
            n_noted = 0
            for i in range(start, min(start + _CHUNK, n)):
                k = (bits[i] >> shift) & _KEY_MASK
                keys[k] += 1
                if special[k]:
                    noted[n_noted] = i
                    n_noted += 1
            for q in range(n_noted):
                b = np.int64(bits[noted[q]])
                keys[(b >> shift) & _KEY_MASK] -= 1
                counts[_bucket(b, scan_from, boundaries, bucket_of, stride, magnitude_mask, shift)] += 1
        for k in range(_KEY_MASK + 1):
            if keys[k]:
                counts[key_bucket[k]] += keys[k]

    @cached
    @numba.njit(nogil=True)
    def _count(
        bits,
        special,
        scan_from,
        key_bucket,
        boundaries,
        bucket_of,
        stride,
        magnitude_mask,
        inf_bits,
        tiny_below,
        counts,
        extremes,
    ):
        shift = _key_shift(bits)
        if bits.shape[0] < _DIRECT_BELOW:
            _extremes(bits, magnitude_mask, inf_bits, extremes)
            for i in range(bits.shape[0]):
                counts[_bucket(np.int64(bits[i]), scan_from, boundaries, bucket_of, stride, magnitude_mask, shift)] += 1
            return
        _key_histogram(
            bits,
            special,
            scan_from,
            key_bucket,
            boundaries,
            bucket_of,
            stride,
            magnitude_mask,
            inf_bits,
            counts,
            extremes,
        )
        if extremes[1] < tiny_below:  # tiny magnitudes were counted as zeros, with their key: move them
            zero = key_bucket[0]
            for i in range(bits.shape[0]):
                b = np.int64(bits[i])
                m = b & magnitude_mask
                if (m > 0) & (m < tiny_below):
                    counts[zero] -= 1
                    counts[_bucket(b, scan_from, boundaries, bucket_of, stride, magnitude_mask, shift)] += 1

    @cached
    @numba.njit(parallel=True)
    def _count_parallel(
        bits,
        special,
        scan_from,
        key_bucket,
        boundaries,
        bucket_of,
        stride,
        magnitude_mask,
        inf_bits,
        tiny_below,
        counts,
        extremes,
        n_pieces,
    ):
        size = (bits.shape[0] + n_pieces - 1) // n_pieces
        local_counts = np.zeros((n_pieces, counts.shape[0]), dtype=np.int64)
        local_ext = np.empty((n_pieces, 2), dtype=np.int64)
        for p in numba.prange(n_pieces):
            local_ext[p, 0] = extremes[0]
            local_ext[p, 1] = extremes[1]
            _count(
                bits[p * size : (p + 1) * size],
                special,
                scan_from,
                key_bucket,
                boundaries,
                bucket_of,
                stride,
                magnitude_mask,
                inf_bits,
                tiny_below,
                local_counts[p],
                local_ext[p],
            )
        for p in range(n_pieces):
            counts += local_counts[p]
            extremes[0] = max(extremes[0], local_ext[p, 0])
            extremes[1] = min(extremes[1], local_ext[p, 1])


_TABLES: dict[object, KernelTables] = {}


def tables_for(layout) -> KernelTables:  # noqa: ANN001 - a BucketLayout
    tables = _TABLES.get(layout)
    if tables is None:
        tables = _TABLES[layout] = KernelTables(key_tables_for(layout))
    return tables


def count_into(x: torch.Tensor, layout, counts: np.ndarray) -> dict[str, float]:  # noqa: ANN001
    """Add the bucket counts of CPU tensor ``x`` (already in ``layout.source``, detached) to ``counts``;
    return its device statistics by name: amax and amin_nonzero of its finite values (0 and inf when
    there are none)."""
    t = tables_for(layout)
    bits = _bits(x, t.signed_view)
    extremes = t.no_extremes.copy()
    threads = numba.get_num_threads()
    large = bits.shape[0] >= _PARALLEL_FROM and threads > 1
    if large and bits.dtype in _THREADED_READY:
        _count_parallel(bits, *t.args, counts, extremes, threads)
    else:
        _count(bits, *t.args, counts, extremes)
        if large:  # after the sequential kernel's own compile, which must not wait for this one
            _compile_threaded_soon(bits.dtype, t)
    hi, lo = extremes.tolist()
    return {"amax": t.to_float(hi), "amin_nonzero": t.to_float(lo)}  # lo: the bits of inf when there is none


# The threaded kernel takes numba's parfor compiler: about 1.9 s per bit width in a fresh environment,
# more than the sequential kernel's whole compile (measured on a 2-core machine: 1.3 s for fp32's,
# 0.7 s for a 16-bit width after it). The first large tensor of a width asks for it, and it is compiled
# (or loaded from the cache) in a background thread once the statistics are next read (``read_many``:
# the close of the first recorded step). Until then the sequential kernel, whose counts are the same,
# measures. Started any sooner, it would hold numba's global compiler lock while the first step's other
# widths wait to compile their sequential kernels. The thread is not a daemon: a short first process
# finishes the compile before it exits, and the next ones load it from the cache.
_THREADED_READY: set[np.dtype] = set()  # bit widths whose threaded kernel is compiled
_THREADED_WANTED: dict[np.dtype, KernelTables] = {}  # asked for, not started: width -> tables to compile with
_THREADED_COMPILING: dict[np.dtype, threading.Thread] = {}
_THREADED_LOCK = threading.Lock()


def _compile_threaded_soon(dtype: np.dtype, tables: KernelTables) -> None:
    """Ask for the threaded kernel for bit patterns of ``dtype`` (``compile_wanted`` starts it)."""
    if dtype not in _THREADED_COMPILING:
        _THREADED_WANTED.setdefault(dtype, tables)


def compile_wanted() -> None:
    """Start compiling, in background threads, the threaded kernels asked for since the last call."""
    if not _THREADED_WANTED:
        return
    with _THREADED_LOCK:
        for dtype, tables in list(_THREADED_WANTED.items()):
            del _THREADED_WANTED[dtype]
            if dtype in _THREADED_COMPILING:
                continue
            thread = threading.Thread(target=_compile_threaded, args=(dtype, tables), name="mpdiag-kernel-compile")
            try:
                thread.start()
            except RuntimeError as err:  # at interpreter shutdown, or a thread limit: keep one thread
                log.debug("mpdiag: the threaded CPU kernel is not compiled (%s)", err)
                continue
            _THREADED_COMPILING[dtype] = thread


def _compile_threaded(dtype: np.dtype, tables: KernelTables) -> None:
    # Compiled (or loaded from the cache) for the signature every later call of this width has, without
    # running it: a parallel region launched from this thread while the main thread runs one would abort
    # the process under numba's workqueue threading layer, which is not thread-safe.
    example = (np.zeros(0, dtype), *tables.args, np.zeros(1, np.int64), tables.no_extremes.copy(), 1)
    compile_signature = getattr(_count_parallel, "compile", None)  # absent with NUMBA_DISABLE_JIT=1
    try:
        if compile_signature is not None:
            compile_signature(tuple(numba.typeof(a) for a in example))
    except Exception as err:  # noqa: BLE001 - the sequential kernel is exact: keep counting with it
        log.warning(
            "mpdiag: the threaded CPU kernel did not compile (%s: %s); large tensors take one thread",
            type(err).__name__,
            err,
        )
        return
    _THREADED_READY.add(dtype)


def finish_compiling() -> None:
    """Compile the threaded kernels asked for and wait until every one is ready (tests and benchmarks:
    the same path every time)."""
    compile_wanted()
    for thread in list(_THREADED_COMPILING.values()):
        thread.join()


_NUMPY_INT = {torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64}


def _bits(x: torch.Tensor, signed_view: torch.dtype) -> np.ndarray:
    """The bit patterns of ``x``'s elements, flat, without copying a contiguous tensor."""
    if x.dtype is torch.bfloat16:  # numpy has no bfloat16: reinterpret in torch
        return x.contiguous().view(signed_view).numpy().reshape(-1)
    return x.contiguous().numpy().reshape(-1).view(_NUMPY_INT[signed_view])


def _bits_to_float(source: torch.dtype):  # noqa: ANN202
    """A function from a magnitude's bit pattern (a Python int) to its float value, for ``source``."""
    if source is torch.bfloat16:  # bf16 is the top half of an fp32
        fp32 = _bits_to_float(torch.float32)
        return lambda bits: fp32(bits << 16)
    int_code, float_code = {torch.float64: ("<q", "<d"), torch.float32: ("<i", "<f"), torch.float16: ("<h", "<e")}[
        source
    ]
    pack, unpack = struct.Struct(int_code).pack, struct.Struct(float_code).unpack
    return lambda bits: unpack(pack(bits))[0]
