"""How names and shares are shown to people: one wording for the advice, the verdicts and the report."""

from __future__ import annotations

import math

__all__ = ["ROOT_LABEL", "display_name", "shown", "percent", "signed_percent", "duration", "byte_size"]

ROOT_LABEL = "<root>"


def display_name(name: str) -> str:
    """A module's name as text reads it: the root module's own name is empty, so it is called '<root>'."""
    return name or ROOT_LABEL


def shown(name: str | None) -> str:
    """``display_name``, or 'none' where there is no name to show (no site limits, say)."""
    return "none" if name is None else display_name(name)


def percent(share: float) -> str:
    """A share as a short percentage that never rounds a loss away: 0.00003 -> '<0.01%'."""
    if share == 0:
        return "0%"
    if share < 1e-4:
        return "<0.01%"
    return f"{100 * share:.3g}%"


def signed_percent(change: float) -> str:
    """A relative change with its sign: 0.004 -> '+0.4%', -0.2 -> '-20%'."""
    if not math.isfinite(change):
        return str(change)
    return ("+" if change >= 0 else "-") + percent(abs(change))


def duration(seconds: float) -> str:
    """Seconds as people read them: '412 ms', '1.05 s'."""
    if not math.isfinite(seconds):
        return "-"
    return f"{1e3 * seconds:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def byte_size(n: int) -> str:
    """Bytes in binary units: '38.2 MiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"
