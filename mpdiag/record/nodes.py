"""Which module's forward created an autograd node: a tag in the node's metadata.

Forward hooks fire as modules finish, innermost first, so the innermost module claims a node before
any enclosing module walks over it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MODULE_KEY", "claim_nodes"]

MODULE_KEY = "mpdiag_module"


def claim_nodes(roots: list[Any], name: str) -> list[Any]:
    """Tag the nodes reachable from ``roots`` that no module claimed yet with ``name``; return them."""
    pending, seen, claimed = list(roots), set(), []
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen or MODULE_KEY in node.metadata:
            continue
        seen.add(id(node))
        node.metadata[MODULE_KEY] = name
        claimed.append(node)
        pending.extend(n for n, _ in node.next_functions)
    return claimed
