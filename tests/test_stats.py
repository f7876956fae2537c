"""TensorStats against a brute-force reference, merge laws, and the documented handling of odd tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cast_truth import from_bits
from hypothesis import given
from hypothesis import strategies as st
from stats_reference import assert_matches_reference, key_edges, threshold_neighbours, wide_range_with_nonfinite

import mpdiag
from mpdiag.core import formats
from mpdiag.core.errors import MpdiagError
from mpdiag.core.stats import TensorStats
from mpdiag.record import _accumulate, _cpu_kernel
from mpdiag.record._accumulate import tensor_stats


@pytest.fixture(autouse=True)
def _both_paths(stats_path: str) -> None:
    """Every test here runs once with torch ops and once with the compiled CPU kernel."""


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_16_bit_value(dtype: torch.dtype) -> None:
    assert_matches_reference(torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype))


@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=200))
def test_any_fp32_bit_patterns(bits: list[int]) -> None:
    assert_matches_reference(from_bits(bits, torch.float32))


# The CPU kernel measures tensors of 8,192 elements and more with a histogram of 13-bit keys and small
# ones element by element: the tests below reach the large-tensor path with arbitrary contents.
_LARGE = 10_000


@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=60), st.integers(0, 2**32 - 1))
def test_any_fp32_bit_patterns_in_a_large_tensor(bits: list[int], filler: int) -> None:
    assert_matches_reference(from_bits(bits * (_LARGE // len(bits)) + [filler] * (_LARGE % len(bits)), torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_every_key_edge_of_the_cpu_kernel(dtype: torch.dtype) -> None:
    """The first value of each 13-bit key (sign and top 12 magnitude bits) and its neighbours, zeros and the
    source's smallest subnormals among them: the values where a key-based count could slip."""
    x = key_edges(dtype)
    assert x.numel() >= _LARGE
    assert_matches_reference(x)
    assert_matches_reference(x[:100])  # and element by element


@given(st.lists(st.floats(width=64), min_size=1, max_size=100))
def test_any_fp64_values(values: list[float]) -> None:
    assert_matches_reference(torch.tensor(values, dtype=torch.float64))


def test_thresholds_and_their_neighbours_in_one_tensor() -> None:
    assert_matches_reference(threshold_neighbours(torch.float32))


def test_realistic_activations_and_layouts() -> None:
    x = torch.randn(64, 33) * torch.logspace(-30, 10, 33)
    assert_matches_reference(x)
    assert_matches_reference(x.t())  # non-contiguous
    assert_matches_reference(x[:, ::3])
    assert_matches_reference(x.to(torch.float8_e4m3fn).float())
    assert_matches_reference(x.to(torch.float8_e5m2))  # fp8 tensors widen exactly
    assert tensor_stats(x.to(torch.float8_e5m2)).dtypes == {"float8_e5m2"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_large_tensors_split_across_threads(dtype: torch.dtype) -> None:
    x = wide_range_with_nonfinite(1 << 18).to(dtype)
    assert_matches_reference(x)  # counted on one thread while the threaded kernel compiles, or threaded
    if _accumulate.use_cpu_kernel():  # the stats_path fixture chose the kernel
        _cpu_kernel.finish_compiling()
        assert {torch.float32: np.int32, torch.float64: np.int64, torch.bfloat16: np.int16}[dtype] in [
            d.type for d in _cpu_kernel._THREADED_READY
        ]
        assert_matches_reference(x)  # threaded


def test_merge_is_exact() -> None:
    a, b = torch.randn(100) * 1e3, torch.randn(50) * 1e-6
    merged = tensor_stats(a).merge(tensor_stats(b))
    whole = tensor_stats(torch.cat([a, b]))
    assert merged.hist.tolist() == whole.hist.tolist() and np.array_equal(merged.casts, whole.casts)
    assert (merged.numel, merged.amax, merged.amin_nonzero) == (whole.numel, whole.amax, whole.amin_nonzero)
    assert merged.calls == 2 and whole.calls == 1


stats_strategy = st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=40).map(
    lambda bits: tensor_stats(from_bits(bits, torch.float32) if bits else torch.empty(0), ("fp16", "e4m3"))
)


@given(stats_strategy, stats_strategy, stats_strategy)
def test_merge_is_associative_and_commutative(a: TensorStats, b: TensorStats, c: TensorStats) -> None:
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(TensorStats.empty(("fp16", "e4m3"))) == a


@given(st.lists(stats_strategy, min_size=1, max_size=6))
def test_merge_all_equals_pairwise_merges(items: list[TensorStats]) -> None:
    pairwise = items[0]
    for s in items[1:]:
        pairwise = pairwise.merge(s)
    assert TensorStats.merge_all(items) == pairwise


def test_merge_refuses_different_formats() -> None:
    with pytest.raises(MpdiagError, match="cannot merge"):
        TensorStats.empty(("fp16",)).merge(TensorStats.empty(("bf16",)))
    mixed = [TensorStats.empty(("fp16",))] * 2 + [TensorStats.empty(("bf16",))]
    with pytest.raises(MpdiagError, match="cannot merge"):
        TensorStats.merge_all(mixed)


def test_counts_add_up() -> None:
    s = tensor_stats(torch.tensor([0.0, 1e-9, 1e-6, 1.0, 1e5, math.nan, math.inf]), ("fp16",))
    assert s.finite == 5 and s.finite_nonzero == 4 and s.nonfinite == 2
    assert (s.underflow("fp16"), s.subnormal("half"), s.normal(torch.float16), s.overflow("fp16")) == (1, 1, 1, 1)
    assert s.hist.sum() == s.finite_nonzero
    with pytest.raises(MpdiagError, match="format 'bf16' was not tracked; tracked formats are fp16"):
        s.underflow("bf16")


@pytest.mark.parametrize("one", ["fp16", "half", torch.float16, formats.FP16], ids=["name", "alias", "dtype", "Format"])
def test_one_format_is_taken_whole_not_as_its_characters(one: object) -> None:
    assert tensor_stats(torch.tensor([1e-9, 7e4]), formats=one).formats == ("fp16",)
    model = torch.nn.Linear(2, 2)
    with mpdiag.diagnose(model, formats=one) as diag:
        model(torch.randn(1, 2)).sum().backward()
    assert diag.run.formats == ("fp16",) and diag.run.stats("", "activation").formats == ("fp16",)
    assert TensorStats.empty(["fp16", "half", torch.bfloat16]).formats == ("fp16", "bf16")


# -- tensors with no floating values to classify ------------------------------------------------------
def test_empty_tensor_counts_a_call_and_nothing_else() -> None:
    s = tensor_stats(torch.empty(0, 3))
    assert (s.numel, s.calls, s.amax, s.amin_nonzero) == (0, 1, 0.0, math.inf)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(4),
        torch.ones(3, dtype=torch.bool),
        torch.randn(3, dtype=torch.complex64),
        torch.randn(4, 4).to_sparse(),
        torch.empty(3, device="meta"),
    ],
    ids=["int", "bool", "complex", "sparse", "meta"],
)
def test_tensors_that_are_skipped(tensor: torch.Tensor) -> None:
    # Integer, bool, complex, sparse and meta tensors are skipped: no call is counted, nothing crashes.
    s = tensor_stats(tensor)
    assert (s.numel, s.calls) == (0, 0)


def test_as_dict_is_flat_plain_data() -> None:
    row = tensor_stats(torch.tensor([1e-9, 7e4]), ("fp16",)).as_dict()
    assert row["fp16_underflow"] == 1 and row["fp16_overflow"] == 1 and row["dtypes"] == "float32"
    assert all(isinstance(v, (int, float, str)) for v in row.values())
