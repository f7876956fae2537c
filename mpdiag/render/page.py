"""The HTML page: a jinja2 template with every value autoescaped (module names are user data)."""

from __future__ import annotations

import base64
import functools
import math
from dataclasses import dataclass
from typing import Any

import jinja2

__all__ = ["EmbeddedFigure", "render_page"]


@dataclass(frozen=True)
class EmbeddedFigure:
    """A figure as the page shows it: PNG bytes inline, and the file written beside the page."""

    name: str
    file: str
    caption: str
    note: str
    png: bytes
    width: int
    height: int

    @property
    def base64(self) -> str:
        return base64.b64encode(self.png).decode("ascii")


def sort_key(value: float | str) -> str:
    """A cell's sort key as JavaScript's Number() reads it (Python writes inf as 'inf', JS wants 'Infinity')."""
    if isinstance(value, str):
        return value
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(float(value))


def share(value: float | None) -> str:
    """A share as a percentage for a table cell; "-" where it is not known."""
    return "-" if value is None else f"{100 * value:.1f}%"


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mpdiag.render", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["sortkey"] = sort_key
    env.filters["share"] = share
    return env


def render_page(template: str = "report.html.j2", **context: Any) -> str:
    """The page ``template`` renders for ``context`` (the template names what it reads): a run's report
    (report.html.j2) or a comparison's (comparison.html.j2)."""
    return _environment().get_template(template).render(**context)
