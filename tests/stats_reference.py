"""The statistics of a tensor computed the slow, obvious way (real casts, float64 numpy), which every
way of measuring (torch ops, the numba kernel, the Triton kernel) must give exactly."""

from __future__ import annotations

import math

import numpy as np
import torch
from cast_truth import neighbours, real_categories

from mpdiag.core import formats
from mpdiag.core.casting import INT_VIEW, Category, thresholds
from mpdiag.core.stats import HIST_EXPONENTS
from mpdiag.record._accumulate import tensor_stats

FORMATS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "tf32", "fp32")


def reference(x: torch.Tensor, names: tuple[str, ...] = FORMATS) -> dict[str, object]:
    """Every statistic computed the slow, obvious way: real casts and float64 numpy."""
    v = x.detach().double().flatten().numpy()
    finite = np.isfinite(v)
    nonzero = finite & (v != 0)
    mags = np.abs(v[nonzero])
    exps = np.clip(np.frexp(mags)[1] - 1, HIST_EXPONENTS[0], HIST_EXPONENTS[-1])
    casts = []
    for name in names:
        cats = real_categories(x.detach().flatten(), formats.get(name))
        casts.append([int((cats == c).sum()) for c in (Category.UNDERFLOW, Category.SUBNORMAL, Category.OVERFLOW)])
    return {
        "numel": v.size,
        "zeros": int((v == 0).sum()),
        "nans": int(np.isnan(v).sum()),
        "posinf": int((v == np.inf).sum()),
        "neginf": int((v == -np.inf).sum()),
        "amax": float(np.abs(v[finite]).max()) if finite.any() else 0.0,
        "amin_nonzero": float(mags.min()) if mags.size else math.inf,
        "hist": np.bincount(exps - HIST_EXPONENTS[0], minlength=len(HIST_EXPONENTS)),
        "casts": np.array(casts, dtype=np.int64).reshape(len(names), 3),
    }


def assert_matches_reference(x: torch.Tensor, names: tuple[str, ...] = FORMATS) -> None:
    got, want = tensor_stats(x, names), reference(x.cpu(), names)
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(getattr(got, key), value), key
        else:
            assert getattr(got, key) == value, (key, getattr(got, key), value)


def key_edges(dtype: torch.dtype) -> torch.Tensor:
    """The first value of each 13-bit key (sign and top 12 magnitude bits) and its neighbours, zeros and
    the source's smallest subnormals among them: the values where a key-based count could slip."""
    width = torch.finfo(dtype).bits
    firsts = torch.arange(1 << 13, dtype=torch.int64) << (width - 13)
    patterns = torch.cat([firsts + d for d in (-2, -1, 0, 1, 2)] + [torch.arange(-3, 4)])
    if width < 64:  # wrap to the signed view's range
        patterns = (patterns + (1 << (width - 1))) % (1 << width) - (1 << (width - 1))
    return patterns.to(INT_VIEW[dtype]).view(dtype)


def threshold_neighbours(dtype: torch.dtype) -> torch.Tensor:
    """Every cast threshold of ``FORMATS`` for ``dtype`` and the values 3 ulps either side, both signs,
    zeros, infinities, NaN and every power of two ``dtype`` holds."""
    values = [0.0, -0.0, math.inf, -math.inf, math.nan]
    for name in FORMATS:
        t = thresholds(formats.get(name), dtype)
        for v in (t.nonzero_from, t.normal_from, t.overflow_from):
            if math.isfinite(v):
                values += neighbours(v, dtype, reach=3)
    info = torch.finfo(dtype)
    smallest = math.frexp(float(info.smallest_normal) * float(info.eps))[1] - 1
    values += [2.0**k for k in range(smallest, math.frexp(float(info.max))[1])]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


def wide_range_with_nonfinite(numel: int) -> torch.Tensor:
    """fp64 values over some 85 decades, with NaN, +inf, -inf and zeros scattered among them."""
    x = torch.randn(numel, dtype=torch.float64) * torch.logspace(-45, 40, numel, dtype=torch.float64)
    x[::997], x[1::991], x[2::983], x[3::977] = math.nan, math.inf, -math.inf, 0.0
    return x
