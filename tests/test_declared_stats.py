"""Each statistic is declared once (mpdiag.core.stats.STATS); merging, the recorder's device state, its
reduction across ranks and the run-file columns follow the declarations."""

from __future__ import annotations

import dataclasses
import math
import sqlite3

import numpy as np
import pytest
import torch

import mpdiag
from mpdiag.core.stats import STATS, Reduce, Source, Stat, Storage, TensorStats
from mpdiag.record import _accumulate
from mpdiag.record._accumulate import DEVICE_STATS, SiteAccumulator, _DeviceStats, _HostPart, reduce_parts


def test_every_statistic_of_tensor_stats_is_declared():
    fields = [f.name for f in dataclasses.fields(TensorStats) if f.name != "formats"]
    assert [s.name for s in STATS] == fields


def test_merging_follows_each_declaration():
    a = mpdiag.tensor_stats(torch.tensor([0.0, 3.0, 1e-3, float("nan")]), "fp16")
    b = mpdiag.tensor_stats(torch.tensor([5e4, 2e-9], dtype=torch.float64), "fp16")
    merged = a.merge(b)
    expected = {Reduce.SUM: lambda x, y: x + y, Reduce.MAX: max, Reduce.MIN: min, Reduce.UNION: frozenset.union}
    for stat in STATS:
        want = expected[stat.reduce](getattr(a, stat.name), getattr(b, stat.name))
        np.testing.assert_array_equal(getattr(merged, stat.name), want, err_msg=stat.name)
    assert merged.dtypes == {"float32", "float64"} and merged.amin_nonzero == 2e-9 and merged.amax == 5e4


@pytest.mark.parametrize("shift", [-3, 0, 7, 40])
def test_undoing_a_loss_scale_follows_each_declaration(shift):
    """Statistics of x, rescaled as declared, equal those of x / 2**shift, but for the casts, which stay
    those the recorded (scaled) values went through."""
    x = torch.tensor([0.0, 3.0, -1e-3, 7e4, 2e-30, float("inf"), float("nan")], dtype=torch.float64)
    recorded = mpdiag.tensor_stats(x, ("fp16", "bf16"))
    true = mpdiag.tensor_stats(x / 2.0**shift, ("fp16", "bf16"))
    rescaled = recorded.rescaled(shift)
    for stat in STATS:
        want = getattr(recorded if stat.name == "casts" else true, stat.name)
        np.testing.assert_array_equal(getattr(rescaled, stat.name), want, err_msg=stat.name)


# A declaration with a summed device statistic (what a mean would add): the device state derives from it.
_WITH_A_SUM = (
    Stat("total", Reduce.SUM, Source.DEVICE, Storage.REAL),
    Stat("top", Reduce.MAX, Source.DEVICE, Storage.REAL),
    Stat("bottom", Reduce.MIN, Source.DEVICE, Storage.REAL),
    Stat("count", Reduce.SUM, Source.BUCKETS, Storage.INTEGER),
)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_device_statistics_pack_combine_and_unpack_as_declared(as_tensor):
    layout = _DeviceStats(_WITH_A_SUM, {"total": 0.0, "top": 0.0, "bottom": math.inf})
    assert layout.names == ["total", "top", "bottom"] and layout.n_sum == 1
    first_values, second_values = {"total": 3.0, "top": 2.0, "bottom": 0.5}, {"total": 4.0, "top": 7.0, "bottom": 0.25}
    if as_tensor:
        first = layout.pack({k: torch.tensor(v) for k, v in first_values.items()})
        second = layout.pack({k: torch.tensor(v) for k, v in second_values.items()})
    else:
        first, second = np.empty(3), np.empty(3)
        layout.pack_into(first, first_values)
        layout.pack_into(second, second_values)
    layout.combine(first, second)
    vector = first.numpy() if as_tensor else first
    assert layout.unpack(vector) == {"total": 7.0, "top": 7.0, "bottom": 0.25}
    assert layout.unpack(layout.initial) == {"total": 0.0, "top": 0.0, "bottom": math.inf}


def _host_part(counts: list[int], values: np.ndarray) -> _HostPart:
    part = _HostPart.__new__(_HostPart)
    part.counts, part.values = np.array(counts, dtype=np.int64), values.copy()
    return part


def _reduce_as_two_ranks(ranks: list[list[_HostPart]], layout: _DeviceStats = DEVICE_STATS) -> list[Reduce]:
    """reduce_parts on two simulated ranks: a first pass records what each rank sends, op by op; in the
    second, each all-reduce combines with the other rank's tensor by the op asked for. Returns the ops."""
    device = torch.device("cpu")
    sent: list[list[torch.Tensor]] = [[], []]
    for rank in (0, 1):
        reduce_parts(ranks[rank], lambda t, op, r=rank: sent[r].append(t.clone()), device, layout)
    ops = {Reduce.SUM: torch.add, Reduce.MAX: torch.maximum}
    seen: list[Reduce] = []
    for rank in (0, 1):
        calls = iter(range(len(sent[rank])))

        def all_reduce(t: torch.Tensor, op: Reduce, r: int = rank, c=calls) -> None:
            seen.append(op)
            t.copy_(ops[op](t, sent[1 - r][next(c)]))

        reduce_parts(ranks[rank], all_reduce, device, layout)
    return seen


def test_a_summed_device_statistic_is_summed_across_ranks_and_the_rest_by_max():
    """Two simulated ranks reduce parts of a declaration with a summed device statistic: the sum is
    summed, the max taken, the (negated) min taken; the bucket counts summed."""
    layout = _DeviceStats(_WITH_A_SUM, {"total": 0.0, "top": 0.0, "bottom": math.inf})
    ranks = [
        [_host_part([1, 2], np.array([3.0, 2.0, -0.5]))],
        [_host_part([4, 0], np.array([4.0, 7.0, -0.25]))],
    ]
    seen_ops = _reduce_as_two_ranks(ranks, layout)
    assert seen_ops == [Reduce.SUM, Reduce.SUM, Reduce.MAX] * 2  # counts; the sums; the max and negated min
    for (part,) in ranks:
        assert part.counts.tolist() == [5, 2]
        assert layout.unpack(part.values) == {"total": 7.0, "top": 7.0, "bottom": 0.25}


def test_a_bucket_statistic_the_layout_does_not_decode_is_refused():
    extra = (*STATS, Stat("positives", Reduce.SUM, Source.BUCKETS, Storage.INTEGER))
    with pytest.raises(TypeError, match="decode the new ones in _layout.decode_many"):
        _accumulate._check_decoded(extra)
    _accumulate._check_decoded(STATS)


def test_a_union_cannot_be_a_device_statistic():
    with pytest.raises(TypeError, match="device statistics cannot reduce by union"):
        _DeviceStats((Stat("names", Reduce.UNION, Source.DEVICE, Storage.NAMES),), {"names": 0.0})


def test_reducing_parts_across_ranks_gives_the_statistics_of_all_their_data():
    """Two simulated ranks: each all-reduce combines with the other rank's tensor by the op asked for."""
    data = [torch.tensor([1.0, -3e5, 0.0, 2e-8]), torch.tensor([7e4, float("inf"), 5e-3])]
    accumulators = [SiteAccumulator(("fp16", "bf16")) for _ in data]
    for acc, x in zip(accumulators, data):
        acc.observe(x)
    _reduce_as_two_ranks([[acc.gathered(torch.float32, torch.device("cpu"))] for acc in accumulators])
    whole = mpdiag.tensor_stats(torch.cat(data), ("fp16", "bf16"))
    for acc in accumulators:
        got = acc.read()
        assert dataclasses.replace(got, calls=1) == whole


def test_the_run_file_has_the_columns_of_the_declarations(tmp_path):
    model = torch.nn.Linear(4, 2)
    path = tmp_path / "run.mpdiag"
    with mpdiag.diagnose(model, run_file=path) as diag:
        model(torch.randn(3, 4)).sum().backward()
    with sqlite3.connect(path) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(stats)")][2:]
    storage_columns = {Storage.SPAN: 2}
    assert len(columns) == sum(storage_columns.get(s.storage, 1) for s in STATS)
    assert {s.name for s in STATS} <= set(columns)
    assert mpdiag.load(path).records == diag.run.records


def test_a_run_file_written_before_a_statistic_existed_reads_it_as_empty(tmp_path):
    model = torch.nn.Linear(4, 2)
    path = tmp_path / "run.mpdiag"
    with mpdiag.diagnose(model, run_file=path) as diag:
        model(torch.randn(3, 4)).sum().backward()
    with sqlite3.connect(path) as db:  # as if calls and dtypes had come later
        db.execute("ALTER TABLE stats DROP COLUMN calls")
        db.execute("ALTER TABLE stats DROP COLUMN dtypes")
    loaded = mpdiag.load(path)
    for site, stats in diag.run.records[0].items():
        assert loaded.records[0][site] == dataclasses.replace(stats, calls=0, dtypes=frozenset())


def test_host_statistics_are_what_the_accumulator_counted():
    acc = SiteAccumulator(("fp16",))
    acc.observe(torch.ones(3, dtype=torch.bfloat16))
    acc.observe(torch.ones(2))
    assert acc.host_stats() == {"calls": 2, "dtypes": frozenset({"bfloat16", "float32"})}
    assert set(acc.host_stats()) == set(_accumulate.HOST_STATS)
