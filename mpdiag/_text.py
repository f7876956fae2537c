"""How module and parameter names are shown to people."""

from __future__ import annotations

ROOT_LABEL = "<root>"


def display_name(name: str) -> str:
    """A module's name as text reads it: the root module's own name is empty, so it is called '<root>'."""
    return name or ROOT_LABEL


def shown(name: str | None) -> str:
    """``display_name``, or 'none' where there is no name to show (no site limits, say)."""
    return "none" if name is None else display_name(name)
