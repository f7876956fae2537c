"""UpdateStats: what one optimizer step did to one parameter, as plain data.

Per parameter and recorded step: how many elements the step changed; how many of those changes a
weight stored in a narrower format would have rounded away (the weight rounded to the format, plus the
update in fp32 arithmetic as torch's optimizers add it, rounded back, gives the weight again: the
update "stalls"); what the weight's own dtype really lost (a non-zero gradient, an unchanged weight);
a log2 histogram of |update| / |weight|; and, for Adam-family optimizers, how many elements had ``eps``
larger than the square root of the bias-corrected second moment (Adam's step there is SGD with
momentum scaled by 1/eps).

Examples:
    >>> u = UpdateStats("w", "float32", numel=10, nonzero=8, stalled={"bf16": 2}, lost=0,
    ...                 ratio_counts=(0,) * RATIO_BINS, from_zero=0)
    >>> u.stalled_share("bf16")
    0.25
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mpdiag.core.errors import MpdiagError

__all__ = ["UpdateStats", "RATIO_LOW", "RATIO_BINS", "ratio_bin_of", "WEIGHT_BITS_AT_LEAST"]

#: The fewest bits a weight is stored in between steps: stalled updates are counted for the formats of
#: at least this many. fp8 recipes (Transformer Engine, torchao) keep the master weights in bf16 or fp32
#: and cast them to fp8 per matmul: no weight takes an fp8 update.
WEIGHT_BITS_AT_LEAST = 16

#: log2 of the lowest |update| / |weight| bin's lower edge: bin i holds ratios in [2^(RATIO_LOW+i),
#: 2^(RATIO_LOW+i+1)); the first bin also holds smaller ratios, the last larger ones. An fp32 weight
#: changes by at least 2^-24 of itself and an fp64 one by 2^-53, so the range loses nothing real.
RATIO_LOW = -64
RATIO_BINS = 80


def ratio_bin_of(log2_ratio: float) -> int:
    """The histogram bin of a ratio whose log2 is ``log2_ratio``."""
    return min(max(math.floor(log2_ratio) - RATIO_LOW, 0), RATIO_BINS - 1)


@dataclass(frozen=True)
class UpdateStats:
    """One parameter's update in one recorded step (or merged over several: every count summed).

    Attributes:
        param: the parameter's name.
        dtype: the dtype the weight is stored in ("float32", "bfloat16", ...).
        numel: elements of the parameter (summed over the steps merged).
        nonzero: elements the step changed (new value != old value).
        stalled: format -> how many of the ``nonzero`` changes a weight stored in that format would
            lose; the formats tracked that are narrower than ``dtype`` and of at least
            WEIGHT_BITS_AT_LEAST bits.
        lost: elements with a non-zero gradient that the step left unchanged (what ``dtype`` really
            lost); None when the parameter had no gradient.
        grad_nonzero: elements with a non-zero gradient (None without a gradient).
        ratio_counts: the log2 histogram of |update| / |old weight| over the changed elements whose old
            weight was non-zero (see ``RATIO_LOW``; ``ratio_edges`` gives the bins' log2 edges).
        from_zero: changed elements whose old weight was zero (no ratio).
        eps_dominated: elements where Adam's ``eps`` exceeded sqrt of the bias-corrected second moment;
            None for optimizers without one.
        eps_numel: the elements eps was judged on (``numel`` of the steps where the optimizer had a
            second moment for the parameter: not a step it skipped, with no gradient); None with none.
        steps: how many recorded steps these counts cover.
    """

    param: str
    dtype: str
    numel: int
    nonzero: int
    stalled: Mapping[str, int]
    lost: int | None
    ratio_counts: tuple[int, ...]
    from_zero: int
    grad_nonzero: int | None = None
    eps_dominated: int | None = None
    steps: int = 1
    eps_numel: int | None = None

    def __post_init__(self) -> None:
        if len(self.ratio_counts) != RATIO_BINS:
            raise MpdiagError(f"ratio_counts must hold {RATIO_BINS} bins, got {len(self.ratio_counts)}")

    def stalled_share(self, fmt: str) -> float:
        """The share of the changed elements that a weight stored in ``fmt`` would lose (0 when none changed)."""
        if fmt not in self.stalled:
            raise MpdiagError(
                f"no stalled count for {fmt!r} for {self.param!r} (stored as {self.dtype}); counted for: "
                f"{', '.join(self.stalled) or 'no format (none tracked is narrower than the weight)'}"
            )
        return self.stalled[fmt] / self.nonzero if self.nonzero else 0.0

    @property
    def lost_share(self) -> float | None:
        """``lost`` over the elements that had a non-zero gradient (None without a gradient)."""
        if self.lost is None or self.grad_nonzero is None:
            return None
        return self.lost / self.grad_nonzero if self.grad_nonzero else 0.0

    @property
    def eps_share(self) -> float | None:
        """The share of the elements judged where ``eps`` dominated Adam's denominator (None without one)."""
        if self.eps_dominated is None or self.eps_numel is None:
            return None
        return self.eps_dominated / self.eps_numel if self.eps_numel else 0.0

    @staticmethod
    def ratio_edges() -> list[int]:
        """log2 of every bin edge of ``ratio_counts``: RATIO_BINS + 1 values."""
        return list(range(RATIO_LOW, RATIO_LOW + RATIO_BINS + 1))

    def share_below(self, log2_ratio: int) -> float:
        """The share of the ratios counted that lie below 2^``log2_ratio`` (a bin edge)."""
        total = sum(self.ratio_counts)
        below = sum(self.ratio_counts[: max(0, min(RATIO_BINS, log2_ratio - RATIO_LOW))])
        return below / total if total else 0.0

    def as_dict(self) -> dict[str, object]:
        """JSON-compatible values of every field (a run file stores them so)."""
        return {
            "param": self.param,
            "dtype": self.dtype,
            "numel": self.numel,
            "nonzero": self.nonzero,
            "stalled": dict(self.stalled),
            "lost": self.lost,
            "ratio_counts": list(self.ratio_counts),
            "from_zero": self.from_zero,
            "grad_nonzero": self.grad_nonzero,
            "eps_dominated": self.eps_dominated,
            "steps": self.steps,
            "eps_numel": self.eps_numel,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> UpdateStats:
        """The inverse of ``as_dict``."""
        return cls(
            param=str(values["param"]),
            dtype=str(values["dtype"]),
            numel=int(values["numel"]),  # type: ignore[call-overload]
            nonzero=int(values["nonzero"]),  # type: ignore[call-overload]
            stalled={str(k): int(v) for k, v in dict(values["stalled"]).items()},  # type: ignore[call-overload]
            lost=_optional_int(values.get("lost")),
            ratio_counts=tuple(int(c) for c in values["ratio_counts"]),  # type: ignore[attr-defined]
            from_zero=int(values["from_zero"]),  # type: ignore[call-overload]
            grad_nonzero=_optional_int(values.get("grad_nonzero")),
            eps_dominated=_optional_int(values.get("eps_dominated")),
            steps=int(values.get("steps", 1)),  # type: ignore[call-overload]
            eps_numel=_optional_int(values.get("eps_numel")),
        )

    @classmethod
    def merge_all(cls, items: Iterable[UpdateStats]) -> UpdateStats:
        """One parameter's updates over several steps: every count summed (a count known in only some
        steps, ``lost`` or ``eps_dominated``, is summed over those)."""
        items = list(items)
        if not items:
            raise MpdiagError("nothing to merge: no UpdateStats given")
        first = items[0]
        if any(u.param != first.param for u in items):
            raise MpdiagError(f"UpdateStats of different parameters: {sorted({u.param for u in items})}")

        def known_sum(values: list[int | None]) -> int | None:
            known = [v for v in values if v is not None]
            return sum(known) if known else None

        return cls(
            param=first.param,
            dtype=first.dtype,
            numel=sum(u.numel for u in items),
            nonzero=sum(u.nonzero for u in items),
            stalled={f: sum(u.stalled.get(f, 0) for u in items) for f in first.stalled},
            lost=known_sum([u.lost for u in items]),
            ratio_counts=tuple(map(sum, zip(*(u.ratio_counts for u in items)))),
            from_zero=sum(u.from_zero for u in items),
            grad_nonzero=known_sum([u.grad_nonzero for u in items]),
            eps_dominated=known_sum([u.eps_dominated for u in items]),
            steps=sum(u.steps for u in items),
            eps_numel=known_sum([u.eps_numel for u in items]),
        )


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]
