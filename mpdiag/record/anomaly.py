"""Working alongside torch's anomaly mode: keep what it reports, change nothing it does.

With ``torch.autograd.set_detect_anomaly(True)`` (or ``detect_anomaly()``), a backward node that returns
NaN makes torch emit the forward traceback of that node as a warning ("Error detected in
LogBackward0. Traceback of forward call that caused the error: ...") and raise a RuntimeError. The
warning is lost when warnings are filtered, and neither says which module the operator ran in.

While a Diagnosis is attached, ``AnomalyWatch``:
- sees that warning even when the user's filters ignore it, and shows it exactly when their filters
  would have (an ``always`` filter for this one message, and a ``showwarning`` that defers to theirs);
- tags, while anomaly mode is on, the autograd nodes each module's forward creates with the module's
  name, and notes the module of each node as backward reaches it, so the failing node's module is known;
- never catches, wraps or rewrites the RuntimeError: it only reads it when it passes the Diagnosis's
  with-block, to keep the exact message.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import replace
from typing import Any

from mpdiag.core.events import AnomalyRecord
from mpdiag.record.nodes import claim_nodes

__all__ = ["AnomalyWatch"]

_WARNING = re.compile(r"Error detected in (\w+)\. Traceback of forward call that caused the error:\n(.*)", re.S)


class AnomalyWatch:
    """Installed for the lifetime of a Diagnosis; see the module docstring."""

    def __init__(self, step: Any) -> None:
        self._step = step  # callable giving the current step index
        self.records: list[AnomalyRecord] = []
        self._backward_module: str | None = None
        self._previous_showwarning: Any = None
        self._filter: tuple[Any, ...] | None = None

    # -- the warning ------------------------------------------------------------------------------
    def install(self) -> None:
        warnings.filterwarnings("always", message=r"Error detected in \w+\. Traceback of forward call")
        self._filter = warnings.filters[0]
        self._previous_showwarning = warnings.showwarning
        warnings.showwarning = self._showwarning

    def keep_installed(self) -> None:
        """Put our filter back in front and our showwarning back in place, in case the user's
        ``catch_warnings`` or ``simplefilter`` (after attaching) displaced them. Called while anomaly
        mode is on, as each module's forward finishes."""
        if self._filter is None:
            return
        if not warnings.filters or warnings.filters[0] is not self._filter:
            # typeshed declares warnings.filters a Sequence; it is the module's list, which filterwarnings() edits too
            if self._filter in warnings.filters:
                warnings.filters.remove(self._filter)  # type: ignore[attr-defined]
            warnings.filters.insert(0, self._filter)  # type: ignore[attr-defined]
            warnings._filters_mutated()  # type: ignore[attr-defined]  # as filterwarnings() does
        if warnings.showwarning != self._showwarning:
            self._previous_showwarning = warnings.showwarning
            warnings.showwarning = self._showwarning

    def uninstall(self) -> None:
        if self._filter is not None and self._filter in warnings.filters:
            warnings.filters.remove(self._filter)  # type: ignore[attr-defined]  # a list (see keep_installed)
            warnings._filters_mutated()  # type: ignore[attr-defined]  # as filterwarnings() does
        if warnings.showwarning == self._showwarning:
            warnings.showwarning = self._previous_showwarning
        self._filter = None

    def _showwarning(
        self,
        message: Any,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        text = str(message)
        match = _WARNING.match(text)
        if match:
            node, stack = match.groups()
            self.records.append(
                AnomalyRecord(
                    message=f"Function '{node}' returned nan values",
                    traceback=_frames(stack),
                    module=self._backward_module,
                    node=node,
                    step=self._step(),
                )
            )
            if self._users_action(text, category) == "ignore":
                return
        self._previous_showwarning(message, category, filename, lineno, file, line)

    def _users_action(self, text: str, category: type[Warning]) -> str:
        """What the user's own filters (all but ours) do with this warning."""
        ours = None if self._filter is None else self._filter[:3]  # None: uninstalled, a stale showwarning
        for action, msg, cat, _module, _lineno in warnings.filters:
            if (action, msg, cat) == ours:
                continue
            if (msg is None or msg.match(text)) and issubclass(category, cat):
                return action
        return warnings.defaultaction  # type: ignore[attr-defined]  # exists at runtime; typeshed omits it

    # -- the module of each node --------------------------------------------------------------------
    def tag(self, name: str, output_grad_fns: list[Any]) -> None:
        """After ``name``'s forward (anomaly mode on): claim the nodes its forward created."""
        self.keep_installed()
        for node in claim_nodes(output_grad_fns, name):
            node.register_prehook(self._entering(name))

    def _entering(self, name: str) -> Any:
        def prehook(grad_outputs: Any) -> None:
            self._backward_module = name

        return prehook

    # -- the error --------------------------------------------------------------------------------
    def saw_exception(self, exc: BaseException | None) -> None:
        """Keep the exact text of anomaly mode's RuntimeError; the exception itself goes on unchanged."""
        if isinstance(exc, RuntimeError) and self.records and "returned nan values" in str(exc):
            last = self.records[-1]
            if f"'{last.node}'" in str(exc):
                self.records[-1] = replace(last, message=str(exc))


def _frames(stack: str) -> tuple[str, ...]:
    """Split torch's formatted traceback into frames (each begins with '  File ')."""
    stack = re.sub(r"\s*\(Triggered internally at [^)]*\)\s*$", "\n", stack)
    parts = re.split(r"(?m)^(?=  File )", stack)
    return tuple(p for p in parts if p.strip())
