"""The package shows its flow: record -> analyse -> render, each layer importing only those below it.

Read from the source (every import statement, also those inside functions and under TYPE_CHECKING):
a lazy import that dodges a cycle is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mpdiag

PACKAGE = Path(mpdiag.__file__).parent

# What each layer may import (besides itself). The top-level modules (the public API, the CLI, the
# demo) sit above every layer and may import any of them.
ALLOWED = {
    "core": set(),
    "io": {"core"},
    "analysis": {"core"},
    "record": {"core"},
    "render": {"core", "analysis"},
    "probe": {"core", "record", "analysis"},
    "integrations": {"core", "record", "analysis", "render", "io"},
}


def _layer(module: str) -> str | None:
    """'mpdiag.record.hooks' -> 'record'; None for a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The mpdiag modules ``path`` imports, anywhere in it."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "mpdiag")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] == "mpdiag":
                # "from mpdiag.core import formats" imports the module mpdiag.core.formats
                found.update(f"{target}.{a.name}" if _is_module(f"{target}.{a.name}") else target for a in node.names)
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def violations(graph: dict[str, set[str]], module: str) -> list[str]:
    """The modules ``module`` imports that its layer may not."""
    layer = _layer(module)
    assert layer is not None
    return sorted(
        t for t in graph[module] if _layer(t) != layer and (_layer(t) is None or _layer(t) not in ALLOWED[layer])
    )


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a path that returns to its start), or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        for target in sorted(graph.get(module, ())):
            if target != module and target in graph and (found := visit(target, path + [module])):
                return found
        done.add(module)
        return None

    return next((found for module in sorted(graph) if (found := visit(module, []))), None)


SOURCES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {_module_name(p): _imports(p) for p in SOURCES}


def test_every_module_sits_in_a_known_layer_or_the_top_level():
    top = sorted(m for m in GRAPH if m.count(".") == 1 and _layer(m) is None)
    assert top == [
        "mpdiag.__main__",
        "mpdiag._moved",
        "mpdiag.cli",
        "mpdiag.demo",
        "mpdiag.diagnose",
        "mpdiag.sinks",
        "mpdiag.toy",
    ]
    unknown = sorted({m.split(".")[1] for m in GRAPH if m.count(".") >= 2} - set(ALLOWED))
    assert unknown == [], f"packages without a layer in ALLOWED: {unknown}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _layer(m) is not None))
def test_a_layer_imports_only_the_layers_below_it(module):
    layer = _layer(module)
    assert violations(GRAPH, module) == [], f"{module} ({layer}) may import only {sorted(ALLOWED[layer])}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _layer(m) == "probe"))
def test_a_probe_reaches_recording_only_through_its_small_public_entry(module):
    """mpdiag.record's package exports what probes need (paused() above all); its modules stay inside."""
    inside = sorted(t for t in GRAPH[module] if _layer(t) == "record" and t != "mpdiag.record")
    assert inside == [], f"{module} imports {inside}; import from mpdiag.record (its __all__) instead"


def test_no_import_cycles():
    assert cycle(GRAPH) is None


def test_the_checks_catch_a_wrong_arrow_a_lazy_import_and_a_cycle(tmp_path, monkeypatch):
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from mpdiag.render import report\n    import mpdiag.record.hooks\n")
    monkeypatch.setattr(f"{__name__}._module_name", lambda path: "mpdiag.core.lazy")
    graph = {"mpdiag.core.lazy": _imports(lazy)}
    assert violations(graph, "mpdiag.core.lazy") == ["mpdiag.record.hooks", "mpdiag.render"]
    assert cycle({"mpdiag.a": {"mpdiag.b"}, "mpdiag.b": {"mpdiag.c"}, "mpdiag.c": {"mpdiag.a"}}) == [
        "mpdiag.a",
        "mpdiag.b",
        "mpdiag.c",
        "mpdiag.a",
    ]
