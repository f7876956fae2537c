"""torch.distributed: statistics of the whole job, not of one rank.

Each rank records its own tensors as usual. When a step closes, the ranks agree on the union of their
sites (a MAX all-reduce of a fingerprint of each rank's sites; only when they differ, an all-gather of
the names), then reduce the statistics with one all-reduce per kind of reduction their declarations
need (``mpdiag.core.stats.STATS``; today one SUM of the bucket counts and one MAX of the extremes,
[amax, -amin_nonzero]), on the statistics' own device. Because the statistics merge exactly, the result
is what one process would have recorded on all ranks' data. A further, tiny collective asks whether
any rank saw NaN/inf; only then are the step's non-finite events gathered, so that each event names the
ranks it appeared on.

What is summed and what is not: activations and their gradients are per-rank data (each rank its own
micro-batch), so they are summed. Parameters that every rank holds whole (DistributedDataParallel) are
the same everywhere, and so are their gradients once DDP has averaged them: those sites are not summed
(each rank keeps its own; rank 0's is written). FSDP2 parameters are DTensor shards, disjoint across
ranks: their statistics are summed, which gives those of the whole parameter.

Example (no process group: nothing to reduce, everything works as in a single process):
    >>> import torch
    >>> active_group(None) is None
    True
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from mpdiag.core.errors import AttachError
from mpdiag.core.events import PHASES, NonFiniteEvent
from mpdiag.core.run import Kind, Site
from mpdiag.core.stats import STATS, Reduce, merge_values
from mpdiag.record._accumulate import Part, SiteAccumulator, is_dtensor, reduce_parts

__all__ = [
    "active_group",
    "rank_of",
    "unwrap",
    "clean_name",
    "is_sharded",
    "is_replicated",
    "replicated_sites",
    "grads_settle_late",
    "reduce_accumulators",
    "reduce_update_counts",
    "gather_events",
    "describe_group",
]

_PER_RANK_KINDS = (Kind.ACTIVATION, Kind.ACTIVATION_GRAD)

# Wrapper modules that insert a level into module and parameter names.
_WRAPPER_SEGMENTS = re.compile(
    r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod|_forward_module)(?=\.|$)"
)


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def active_group(group: Any) -> Any:
    """The process group to reduce over: ``group``, else the default group when one is initialised;
    None without torch.distributed (everything then works as in a single process)."""
    if not torch.distributed.is_available() or not _dist().is_initialized():
        if group is not None:
            raise AttachError(
                "group= was given but no torch.distributed process group is initialised; call "
                "torch.distributed.init_process_group first (torchrun sets up its environment)"
            )
        return None
    return group if group is not None else _dist().group.WORLD


def rank_of(group: Any) -> int:
    """This process's rank in ``group`` (0 without a group)."""
    return 0 if group is None else _dist().get_rank(group)


def describe_group(group: Any) -> dict[str, Any]:
    """Facts of the process group for a run's environment."""
    if group is None:
        return {}
    dist = _dist()
    return {"world_size": dist.get_world_size(group), "backend": str(dist.get_backend(group))}


def unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """The user's own module inside a DistributedDataParallel or FSDP wrapper, and whether its parameters
    are replicated on every rank (DDP). FSDP2 (``fully_shard``) wraps nothing: its modules are the user's."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, True
    flat = [n for n, _ in model.named_parameters() if "flat_param" in n]
    if flat:
        raise AttachError(
            "this model is wrapped in FSDP (FullyShardedDataParallel) with flattened parameters, "
            f"so per-parameter statistics are not available (e.g. {flat[0]!r}); wrap it with "
            "use_orig_params=True, or use FSDP2's fully_shard"
        )
    return model, False


def clean_name(name: str) -> str:
    """A module or parameter name without the levels that wrappers insert (FSDP, checkpointing, compile)."""
    return _WRAPPER_SEGMENTS.sub("", name).lstrip(".")


def _placements(param: torch.Tensor) -> tuple[Any, ...] | None:
    return getattr(param, "placements", None) if is_dtensor(param) else None


def is_sharded(param: torch.Tensor) -> bool:
    """A DTensor with a Shard placement: each rank holds a disjoint part."""
    placements = _placements(param)
    return placements is not None and any(type(p).__name__.endswith("Shard") for p in placements)


def is_replicated(param: torch.Tensor, ddp: bool) -> bool:
    """Every rank holds the whole, identical parameter: under DDP, or a DTensor replicated everywhere."""
    placements = _placements(param)
    if placements is not None:
        return not is_sharded(param)
    return ddp


def replicated_sites(params: Mapping[str, torch.Tensor], ddp: bool) -> set[Site]:
    """The parameter and gradient sites every rank holds whole and alike: not summed across ranks."""
    return {
        Site(name, kind)
        for name, p in params.items()
        if is_replicated(p, ddp)
        for kind in (Kind.PARAM, Kind.PARAM_GRAD)
    }


def grads_settle_late(params: Mapping[str, torch.Tensor], ddp: bool) -> bool:
    """Whether gradients take their final value only after backward: DDP averages them once backward has
    accumulated them, FSDP2 reduce-scatters them. They are then measured when the step closes."""
    return ddp or any(is_dtensor(p) for p in params.values())


# -- reducing the statistics ----------------------------------------------------------------------
def _describe(live: Mapping[Site, SiteAccumulator]) -> dict[Site, tuple[dict[str, Any], list[str]]]:
    """Per site: its host statistics (calls, dtypes seen) and the source dtypes of what it observed (what
    the buckets are laid out by), in a form that pickles and fingerprints alike on every rank."""
    return {
        s: (
            {k: sorted(v) if isinstance(v, frozenset) else v for k, v in acc.host_stats().items()},
            sorted(str(d) for d in acc.sources()),
        )
        for s, acc in live.items()
    }


def _combine_host_stats(kind: Kind, mine: dict[str, Any] | None, theirs: dict[str, Any]) -> dict[str, Any]:
    """Two ranks' host statistics of one site, combined as each is declared; but per-rank data was observed
    once per rank (summed), while a sharded parameter was observed once, whatever its shards (max)."""
    if mine is None:
        return {k: frozenset(v) if isinstance(v, list) else v for k, v in theirs.items()}
    out = {}
    for stat in (s for s in STATS if s.name in theirs):
        summed_once = stat.reduce is Reduce.SUM and kind not in _PER_RANK_KINDS
        out[stat.name] = merge_values(Reduce.MAX if summed_once else stat.reduce, [mine[stat.name], theirs[stat.name]])
    return out


def reduce_accumulators(
    live: dict[Site, SiteAccumulator], accumulator: Any, group: Any, replicated: set[Site]
) -> dict[Site, SiteAccumulator]:
    """Reduce every site's statistics across ``group``, in place; returns the sites to read (the union
    over ranks: a site only some ranks saw is read everywhere). ``accumulator(site)`` makes a missing one.

    Sites in ``replicated`` keep this rank's own statistics."""
    mine = _describe({s: a for s, a in live.items() if s not in replicated})
    union: dict[Site, tuple[dict[str, Any], set[str]]] = {}
    for described in _gather_unless_all_alike(mine, group):
        for site, (host, sources) in described.items():
            seen, parts = union.get(site, (None, set()))
            union[site] = (_combine_host_stats(site.kind, seen, host), parts | set(sources))
    device = _collective_device(group)
    ordered: list[Part] = []
    out = {s: a for s, a in live.items() if s in replicated}
    for site, (host, sources) in sorted(union.items()):
        acc = live.get(site) or accumulator(site)
        acc.set_host_stats(host)
        ordered.extend(acc.gathered(_dtype(source), device) for source in sorted(sources))
        out[site] = acc
    reduce_parts(ordered, lambda tensor, op: _dist().all_reduce(tensor, op=_reduce_ops()[op], group=group), device)
    return out


def reduce_update_counts(counts: dict[str, torch.Tensor], group: Any, replicated: set[Site]) -> dict[str, torch.Tensor]:
    """Each parameter's update counts (``mpdiag.record._updates``) summed across ``group``: a shard counts
    its own elements. Parameters every rank holds whole (``replicated``) keep this rank's counts. The
    union of the parameters over ranks is read everywhere (zeros where a rank had none)."""
    mine = {name: c.numel() for name, c in counts.items() if Site(name, Kind.PARAM) not in replicated}
    union: dict[str, int] = {}
    for theirs in _gather_unless_all_alike(mine, group):
        union.update(theirs)
    if not union:
        return counts
    device = _collective_device(group)
    names = sorted(union)
    flat = torch.cat(
        [counts[n].to(device) if n in mine else torch.zeros(union[n], dtype=torch.int64, device=device) for n in names]
    )
    _dist().all_reduce(flat, op=_dist().ReduceOp.SUM, group=group)
    out = {n: c for n, c in counts.items() if n not in mine}
    out.update(zip(names, flat.split([union[n] for n in names])))
    return out


def _reduce_ops() -> dict[Reduce, Any]:
    dist = _dist()
    return {Reduce.SUM: dist.ReduceOp.SUM, Reduce.MAX: dist.ReduceOp.MAX}  # what reduce_parts asks for


def _gather_unless_all_alike(mine: Any, group: Any) -> list[Any]:
    """Every rank's ``mine``. Usually all ranks saw the same sites the same number of times: one MAX
    all-reduce of a fingerprint and its negation shows that, and the pickled all-gather is skipped."""
    dist = _dist()
    world = dist.get_world_size(group)
    fingerprint = zlib.crc32(repr(sorted(mine.items())).encode())
    check = torch.tensor([fingerprint, -fingerprint], dtype=torch.int64, device=_collective_device(group))
    dist.all_reduce(check, op=dist.ReduceOp.MAX, group=group)
    if int(check[0]) == -int(check[1]):  # the largest equals the smallest: all alike
        return [mine] * world
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    return everyone


def _anyone(flag: bool, group: Any) -> bool:
    """Whether ``flag`` is true on some rank (one tiny MAX all-reduce)."""
    dist = _dist()
    value = torch.tensor([int(flag)], dtype=torch.int64, device=_collective_device(group))
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value[0])


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


def _collective_device(group: Any) -> torch.device:
    backend = str(_dist().get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- non-finite events ----------------------------------------------------------------------------
def gather_events(events: Iterable[NonFiniteEvent], group: Any, replicated: set[Site]) -> list[NonFiniteEvent]:
    """Every rank's events of the step, merged: one event per (site, phase, position) with the counts
    summed over ranks (taken once for ``replicated`` sites, the same on every rank) and ``ranks`` naming
    where it appeared; the first of each phase is marked produced."""
    mine = [(e.name, e.kind, e.phase, e.seq, e.nans, e.posinf, e.neginf, e.step) for e in events]
    if not _anyone(bool(mine), group):  # the usual step: nothing to gather
        return []
    everyone: list[Any] = [None] * _dist().get_world_size(group)
    _dist().all_gather_object(everyone, mine, group=group)
    merged: dict[tuple[Any, ...], list[Any]] = {}
    for rank, rows in enumerate(everyone):
        for name, kind, phase, seq, nans, posinf, neginf, step in rows:
            entry = merged.setdefault((step, phase, seq, name, kind), [0, 0, 0, []])
            combine = max if Site(name, Kind(kind)) in replicated else int.__add__
            entry[0], entry[1], entry[2] = combine(entry[0], nans), combine(entry[1], posinf), combine(entry[2], neginf)
            entry[3].append(rank)
    out, firsts = [], set()
    for (step, phase, seq, name, kind), (nans, posinf, neginf, ranks) in sorted(
        merged.items(), key=lambda item: (item[0][0], PHASES.index(item[0][1]), item[0][2])
    ):
        out.append(
            NonFiniteEvent(step, name, kind, phase, nans, posinf, neginf, seq, phase not in firsts, ranks=tuple(ranks))
        )
        firsts.add(phase)
    return out
