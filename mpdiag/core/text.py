"""How names and shares are shown to people: one wording for the advice, the verdicts and the report."""

from __future__ import annotations

__all__ = ["ROOT_LABEL", "display_name", "shown", "percent"]

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
