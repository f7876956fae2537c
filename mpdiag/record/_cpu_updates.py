"""A compiled kernel (numba) for one parameter's update counts on the CPU, equal to the torch path.

``_updates.count_update`` in torch ops makes some sixty passes over a parameter (masks, four casts
there and back, the ratio's division and exponent, a scatter-add): about 200 ns per element on a
2-core machine, seconds per step for a convnet's 11M weights. This kernel makes one pass, in threads.

Rounding to a format is computed, not cast, from the format's constants (``mpdiag.core.formats``: from
``torch.finfo`` and a probed cast): a finite value of magnitude ``a`` below the format's overflow
threshold rounds to rint(a / 2^q) * 2^q, where 2^q is the format's unit in the last place at ``a``
(q = max(floor(log2 a), emin) - mantissa bits) and ``rint`` rounds half to even, as torch's casts do;
at or past the threshold it becomes inf, NaN or max as the probe found. The arithmetic is exact in
float64 for the fp32, bf16 and fp16 weights it is given (fp64 weights take the torch path: torch casts
them to the narrow formats through fp32). The tests check it against the torch path, which casts.

Used for CPU tensors when numba is installed (``mpdiag[fast]``) and not disabled (``MPDIAG_NUMBA=0``);
compiled in the background on first use (``available``) and cached like the statistics kernel
(``_kernel_cache``).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Sequence

import numpy as np
import torch

from mpdiag.core.formats import Format, Overflow
from mpdiag.core.updates import RATIO_BINS, RATIO_LOW
from mpdiag.record import _cpu_kernel

__all__ = ["usable", "available", "finish_compiling", "count"]

log = logging.getLogger(__name__)

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OVERFLOW_CODES = {Overflow.INF: 0, Overflow.NAN: 1, Overflow.SATURATE: 2}
_CHUNK = 1 << 14  # elements per task of the threaded loop
_PARALLEL_FROM = 1 << 15  # fewer elements than this: counted in the calling thread

try:
    import numba

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised where numba is absent
    _HAVE_NUMBA = False  # and ``numba`` undefined: only code that runs when it is installed uses it


def usable(weight: torch.Tensor) -> bool:
    """Whether ``weight``'s counts can be taken by the kernel: numba is installed and enabled, and
    ``weight`` is a CPU tensor of a dtype the kernel rounds exactly."""
    return _cpu_kernel.available() and _HAVE_NUMBA and weight.device.type == "cpu" and weight.dtype in _WEIGHT_DTYPES


def available(weight: torch.Tensor) -> bool:
    """Whether the kernel counts ``weight``'s update now: ``usable`` and compiled. The first call starts
    the compile in a background thread (about 5 s on a 2-core machine in a fresh environment, 0.4 s to
    load from the cache); until it is ready, the torch path counts, with the same counts."""
    if not usable(weight):
        return False
    if _COMPILED.is_set():
        return True
    _start_compiling()
    return False


def finish_compiling() -> None:
    """Compile the kernel and wait until it is ready (tests and benchmarks: the same path every time)."""
    _start_compiling()
    for thread in list(_COMPILING):
        thread.join()


_COMPILED = threading.Event()
_COMPILING: list[threading.Thread] = []
_LOCK = threading.Lock()


def _start_compiling() -> None:
    with _LOCK:
        if _COMPILING or not _HAVE_NUMBA:
            return
        # Not a daemon: a short first process finishes the compile before it exits, and the next ones
        # load it from the cache.
        thread = threading.Thread(target=_compile, name="mpdiag-update-kernel-compile")
        try:
            thread.start()
        except RuntimeError as err:  # at interpreter shutdown, or a thread limit: the torch path counts
            log.debug("mpdiag: the update kernel is not compiled (%s)", err)
            return
        _COMPILING.append(thread)


def _compile() -> None:
    # Compiled (or loaded from the cache) for the one signature every call has, without running it: a
    # parallel region launched from this thread while the main thread runs one would abort the process
    # under numba's workqueue threading layer.
    f32, f64 = np.zeros(0, np.float32), np.zeros(0, np.float64)
    arrays = (
        f32,
        np.zeros(0, np.int32),
        f64,
        f32,
        f32,
        0.0,
        np.zeros((1, 1)),
        np.zeros((1, 3, 1)),
        np.zeros(1, np.int64),
        8,
    )
    signature = tuple(numba.typeof(a) for a in arrays)
    try:
        for kernel, extra in ((_count_parallel, ()), (_count_range, (0, 0))):
            compile_signature = getattr(kernel, "compile", None)  # absent with NUMBA_DISABLE_JIT=1
            if compile_signature is not None:
                compile_signature(signature + tuple(numba.typeof(a) for a in extra))
    except Exception as err:  # noqa: BLE001 - the torch path is exact: keep counting with it
        log.warning(
            "mpdiag: the update kernel did not compile (%s: %s); the torch path counts", type(err).__name__, err
        )
        return
    _COMPILED.set()


#: log2 of the largest magnitude a table covers: past every narrow format's overflow threshold.
_TOP_EXPONENT = 128
# The columns of format_constants' rows.
_EMIN, _THRESHOLD, _MAX, _OVERFLOW, _MANTISSA, _EMAX, _SIGNIFICANDS = range(7)


@functools.lru_cache(maxsize=64)
def format_constants(stall: tuple[Format, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per format, (row of constants, tables).

    Constants: the exponent of the smallest normal, the overflow threshold, max, what overflow gives (0
    inf, 1 NaN, 2 max), the mantissa bits, the exponent of max and 2^(mantissa bits + 1), the
    significands of a binade. Tables, for each exponent e from the smallest normal's to _TOP_EXPONENT,
    with q = e - mantissa bits: 1.5 * 2^(q + 52), which added and subtracted again rounds a float64 of
    magnitude in [2^e, 2^(e+1)) to a multiple of 2^q, half to even; 2^q, the format's spacing there;
    and 2^-q. A magnitude below the smallest normal takes the first entries: the subnormals' spacing.
    """
    constants = np.array(
        [
            (
                _exponent(f.min_normal),
                f.overflow_threshold,
                f.max,
                _OVERFLOW_CODES[f.overflow],
                f.mantissa_bits,
                _exponent(f.max),
                2 ** (f.mantissa_bits + 1),
            )
            for f in stall
        ],
        dtype=np.float64,
    ).reshape(len(stall), 7)
    tables = np.zeros((len(stall), 3, _TOP_EXPONENT + 160), dtype=np.float64)
    for i, f in enumerate(stall):
        emin = _exponent(f.min_normal)
        for j, e in enumerate(range(emin, _TOP_EXPONENT + 1)):
            tables[i, 0, j] = math.ldexp(1.5, e - f.mantissa_bits + 52)
            tables[i, 1, j] = math.ldexp(1.0, e - f.mantissa_bits)
            tables[i, 2, j] = math.ldexp(1.0, f.mantissa_bits - e)
    return constants, tables


def _exponent(value: float) -> int:
    """floor(log2(value)) of a positive value."""
    return math.frexp(value)[1] - 1


def count(
    before: torch.Tensor,
    update: torch.Tensor,
    grad: torch.Tensor | None,
    second_moment: tuple[torch.Tensor, float] | None,
    stall: Sequence[Format],
    head: int,
) -> torch.Tensor:
    """The counts vector of ``_updates.count_update`` (``head`` leading slots, then the stalled counts,
    then the ratio histogram), for CPU tensors."""
    weights = _flat(before, torch.float32)
    changes = _flat(update, torch.float64)
    grads = _flat(grad, torch.float32) if grad is not None else np.zeros(0, np.float32)
    if second_moment is not None:
        moments, bound = _flat(second_moment[0], torch.float32), float(second_moment[1])
    else:
        moments, bound = np.zeros(0, np.float32), 0.0
    out = np.zeros(head + len(stall) + RATIO_BINS, dtype=np.int64)
    constants, tables = format_constants(tuple(stall))
    _count(
        weights,
        changes,
        grads,
        moments,
        bound,
        constants,
        tables,
        out,
        head,
        grad is not None,
        second_moment is not None,
    )
    return torch.from_numpy(out)


def _flat(x: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """``x`` as a flat contiguous numpy array of ``dtype`` (the compiled signature's), a view where it can be."""
    return np.ascontiguousarray(x.detach().reshape(-1).to(dtype).numpy())


if _HAVE_NUMBA:
    try:
        from mpdiag.record._kernel_cache import cached
    except ImportError:  # numba internals the cache relies on moved: compile in each process instead

        def cached(dispatcher):  # noqa: ANN001, ANN202
            return dispatcher

    @cached
    @numba.njit(nogil=True)
    def _count_range(weights, bits, changes, grads, moments, bound, constants, tables, out, head, start, stop):  # noqa: ANN001, ANN202
        """The counts of elements [start, stop) added into ``out`` (the layout of ``_updates._HEAD``).

        ``bits`` is ``weights`` viewed as int32: a weight's exponent is read from it (an fp32 subnormal
        reads as -127, below every narrow format's smallest normal, where the subnormals' spacing
        applies). Per format, the stored weight is rounded with the table, and whether the moved weight
        rounds back to it is read off the interval that does: half the spacing on either side (a quarter
        below a power of two above the smallest normal, where the spacing halves), ties to the even
        neighbour; past max, what the format's overflow gives."""
        with_grad = grads.size > 0
        with_eps = moments.size > 0
        n_formats = constants.shape[0]
        stalled = np.zeros(n_formats, dtype=np.int64)
        ratios = np.zeros(RATIO_BINS, dtype=np.int64)
        buffer = np.zeros(1, dtype=np.float64)  # how numba reads a float64's bits: through an int64 view
        buffer_bits = buffer.view(np.int64)
        nonzero = from_zero = grad_nonzero = lost = eps_dominated = 0
        for i in range(start, stop):
            b = np.float64(weights[i])
            d = changes[i]
            changed = d != 0.0
            if changed:
                nonzero += 1
                if b == 0.0:
                    from_zero += 1
                else:
                    ratio = abs(d) / abs(b)
                    if ratio == ratio and ratio != math.inf:  # floor(log2 ratio) from its bits: a normal double
                        buffer[0] = ratio
                        exponent = ((buffer_bits[0] >> 52) & 0x7FF) - 1023
                        ratios[min(max(exponent - RATIO_LOW, 0), RATIO_BINS - 1)] += 1
                magnitude = abs(b)
                finite = magnitude == magnitude and magnitude != math.inf
                raw = np.int64((bits[i] >> 23) & 0xFF) - 127
                d32 = np.float32(d)
                sign = 1.0 if b > 0.0 else -1.0
                for f in range(n_formats if finite else 0):  # an inf or NaN weight stalls in no format
                    emin = np.int64(constants[f, _EMIN])
                    if magnitude >= constants[f, _THRESHOLD]:
                        if constants[f, _OVERFLOW] != 2.0:
                            continue  # stored as inf or NaN: not a weight that can stall
                        e = np.int64(constants[f, _EMAX])
                        stored_abs = constants[f, _MAX]
                    else:
                        e = max(raw, emin)
                        magic = tables[f, 0, e - emin]
                        stored_abs = (magnitude + magic) - magic
                        if stored_abs >= tables[f, 1, e - emin] * constants[f, _SIGNIFICANDS]:
                            e += 1  # rounded up into the next binade
                    spacing = tables[f, 1, e - emin]
                    stored = stored_abs * sign
                    moved = np.float64(np.float32(np.float32(stored) + d32))
                    # Branch-free from here (the outcomes are data, unpredictable): & and |, not and/or.
                    # A NaN moved fails every comparison, so it never stays.
                    steps = np.int64(stored_abs * tables[f, 2, e - emin])  # the stored significand
                    away = (moved - stored) * sign  # signed distance, away from zero
                    dist = abs(away)
                    quarter = (away < 0.0) & (e > emin) & (2 * steps == np.int64(constants[f, _SIGNIFICANDS]))
                    half = spacing * (0.25 if quarter else 0.5)  # below a power of two the spacing halves
                    stays = (dist < half) | ((dist == half) & ((steps & 1) == 0))
                    saturated = (away >= 0.0) & (stored_abs == constants[f, _MAX]) & (constants[f, _OVERFLOW] == 2.0)
                    stays = (stays & ~saturated) | (saturated & (dist == dist))  # past max (inf too) saturates
                    stalled[f] += np.int64(stays)
            if with_grad and grads[i] != 0.0:
                grad_nonzero += 1
                if not changed:
                    lost += 1
            if with_eps and np.float64(moments[i]) < bound:
                eps_dominated += 1
        out[1] += nonzero
        out[2] += from_zero
        out[4] += grad_nonzero
        out[5] += lost
        out[7] += eps_dominated
        for f in range(n_formats):
            out[head + f] += stalled[f]
        for k in range(RATIO_BINS):
            out[head + n_formats + k] += ratios[k]

    @cached
    @numba.njit(parallel=True, nogil=True)
    def _count_parallel(weights, bits, changes, grads, moments, bound, constants, tables, out, head):  # noqa: ANN001, ANN202
        """``_count_range`` over every element, a chunk per task, summed into ``out``."""
        n = weights.size
        chunks = (n + _CHUNK - 1) // _CHUNK
        partial = np.zeros((max(chunks, 1), out.size), dtype=np.int64)
        for c in numba.prange(chunks):
            stop = min(n, (c + 1) * _CHUNK)
            _count_range(
                weights, bits, changes, grads, moments, bound, constants, tables, partial[c], head, c * _CHUNK, stop
            )
        for j in range(out.size):
            out[j] = partial[:, j].sum()


def _count(weights, changes, grads, moments, bound, constants, tables, out, head, with_grad, with_eps):  # noqa: ANN001, ANN202
    # The slots of _updates._HEAD: numel 0, nonzero 1, from_zero 2, with_grad 3, grad_nonzero 4, lost 5,
    # with_eps 6, eps_dominated 7 (the tests compare every slot with the torch path's).
    bits = weights.view(np.int32)
    if weights.size >= _PARALLEL_FROM:
        _count_parallel(weights, bits, changes, grads, moments, bound, constants, tables, out, head)
    else:  # below this, waking threads costs more than they save
        _count_range(weights, bits, changes, grads, moments, bound, constants, tables, out, head, 0, weights.size)
    out[0] = weights.size
    out[3] = int(with_grad)  # given, not grads.size > 0: a parameter of 0 elements has a gradient too
    out[6] = int(with_eps)
