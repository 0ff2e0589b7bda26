"""Rules the whole codebase keeps, checked on its source: cancellation is never swallowed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

SOURCES = sorted(p for package in ("canary", "probes", "exporter") for p in (ROOT / package).rglob("*.py"))
_CANCEL_CATCHERS = {"CancelledError", "BaseException"}


def _names(node: ast.expr | None) -> set[str]:
    if node is None:
        return {"BaseException"}  # a bare `except:`
    if isinstance(node, ast.Tuple):
        return {name for element in node.elts for name in _names(element)}
    if isinstance(node, ast.Attribute):
        return {node.attr}
    if isinstance(node, ast.Name):
        return {node.id}
    return set()


def _reraises(handler: ast.ExceptHandler) -> bool:
    """The handler ends by raising again (a bare `raise`, or `raise` of the caught exception)."""
    for statement in ast.walk(handler):
        if isinstance(statement, ast.Raise) and (
            statement.exc is None or (isinstance(statement.exc, ast.Name) and statement.exc.id == handler.name)
        ):
            return True
    return False


def swallowed_cancellations(source: str) -> list[int]:
    tree = ast.parse(source)
    return [
        handler.lineno
        for handler in ast.walk(tree)
        if isinstance(handler, ast.ExceptHandler) and _names(handler.type) & _CANCEL_CATCHERS and not _reraises(handler)
    ]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_handler_swallows_cancellation(path: Path) -> None:
    """A probe that swallows CancelledError cannot be timed out, reloaded or stopped (it once held every SIGHUP)."""
    lines = swallowed_cancellations(path.read_text())
    assert not lines, f"{path.relative_to(ROOT)} catches CancelledError/BaseException without re-raising at lines {lines}"


def test_the_check_finds_a_swallowed_cancellation() -> None:
    swallowing = "try:\n    pass\nexcept (Exception, asyncio.CancelledError):\n    pass\n"
    reraising = "try:\n    pass\nexcept asyncio.CancelledError:\n    cleanup()\n    raise\n"
    assert swallowed_cancellations(swallowing) == [3]
    assert swallowed_cancellations(reraising) == []
    assert swallowed_cancellations("try:\n    pass\nexcept:\n    pass\n") == [3]
