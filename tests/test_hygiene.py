"""Habits of the test suite, read from its sources with ast so that they stay kept.

- A test file imports shared helpers from a helper module (models.py, nonfinite_models.py, ...), never from
  another test file: importing a test module runs its collection-time code and ties the two files together.
- Every pytest.raises / pytest.warns of an mpdiag error or warning says, with match=, the part of the message
  a user relies on: without it, any error of that type (a different mistake, a typo) passes the test.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "mpdiag"
TEST_SOURCES = sorted(TESTS.glob("*.py"))
ROOTS = ("MpdiagError", "MpdiagWarning")


def _is_test_module(dotted: str) -> bool:
    """Whether an imported module name is a test file: test_x, tests.test_x (or a name inside one)."""
    parts = dotted.split(".")
    if parts[0] == "tests":
        parts = parts[1:]
    return bool(parts) and parts[0].startswith("test_")


def imported_test_modules(source: str) -> list[str]:
    """The test modules ``source`` imports, anywhere in it (also inside functions)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _is_test_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if _is_test_module(module):
                found.append(module)
            elif module in ("", "tests"):  # from tests import test_x; from . import test_x
                found += [a.name for a in node.names if a.name.startswith("test_")]
    return found


@functools.cache
def mpdiag_error_types() -> frozenset[str]:
    """Names of MpdiagError, MpdiagWarning and every class of mpdiag's sources derived from them."""
    bases: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = {
                    b.id if isinstance(b, ast.Name) else b.attr
                    for b in node.bases
                    if isinstance(b, (ast.Name, ast.Attribute))
                }
    found = set(ROOTS)
    while True:
        more = {name for name, of in bases.items() if of & found} - found
        if not more:
            return frozenset(found)
        found |= more


def _type_names(node: ast.expr) -> set[str]:
    """The class names an expected-exception argument can be: X, mpdiag.X, (X, Y), X if c else Y."""
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Attribute):
        return {node.attr}
    if isinstance(node, ast.Tuple):
        return set().union(*(_type_names(e) for e in node.elts))
    if isinstance(node, ast.IfExp):
        return _type_names(node.body) | _type_names(node.orelse)
    return set()


def unmatched_checks(source: str, types: frozenset[str]) -> list[int]:
    """Lines of pytest.raises / pytest.warns calls on one of ``types`` without match=."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        expected = (
            node.args[0]
            if node.args
            else next((k.value for k in node.keywords if k.arg in ("expected_exception", "expected_warning")), None)
        )
        if expected is None:
            continue
        func = node.func
        name = (
            func.attr
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "pytest"
            else func.id
            if isinstance(func, ast.Name)
            else None
        )
        if (
            name in ("raises", "warns")
            and _type_names(expected) & types
            and not any(k.arg == "match" for k in node.keywords)
        ):
            lines.append(node.lineno)
    return sorted(lines)


@pytest.mark.parametrize("path", TEST_SOURCES, ids=lambda p: p.name)
def test_no_test_file_imports_another(path: Path) -> None:
    imported = imported_test_modules(path.read_text(encoding="utf-8"))
    assert imported == [], f"{path.name} imports {imported}: move what it shares into a helper module"


@pytest.mark.parametrize("path", TEST_SOURCES, ids=lambda p: p.name)
def test_every_check_of_an_mpdiag_error_or_warning_matches_its_message(path: Path) -> None:
    lines = unmatched_checks(path.read_text(encoding="utf-8"), mpdiag_error_types())
    assert lines == [], f"{path.name}, lines {lines}: pytest.raises/warns of an mpdiag type without match="


def test_the_checks_catch_what_they_are_for() -> None:
    imports = (
        "from test_models import x\nimport test_a\nimport tests.test_b\nfrom tests import test_c\n"
        "from . import test_d\nfrom .test_e import y\ndef f():\n    from test_f import z\n"
        "import models, testing, tests.models\nfrom tests import models\nfrom models import test_helper\n"
    )
    assert imported_test_modules(imports) == [
        "test_models",
        "test_a",
        "tests.test_b",
        "test_c",
        "test_d",
        "test_e",
        "test_f",
    ]
    types = mpdiag_error_types()
    assert {
        "MpdiagError",
        "MpdiagWarning",
        "AttachError",
        "RunFileError",
        "NonFiniteError",
        "UnknownFormatError",
        "UnknownSiteError",
    } <= types and "ValueError" not in types
    checks = (
        "pytest.raises(MpdiagError)\npytest.raises(mpdiag.RunFileError)\npytest.warns(MpdiagWarning)\n"
        "pytest.raises(AttachError if n else RuntimeError)\npytest.raises((ValueError, NonFiniteError))\n"
        "raises(UnknownSiteError)\npytest.raises(MpdiagError, match='what to do')\npytest.raises(ValueError)\n"
        "pytest.raises(RuntimeError)\npytest.raises(expected_exception=AttachError)\n"
    )
    assert unmatched_checks(checks, types) == [1, 2, 3, 4, 5, 6, 10]
