"""Conditions on a JSON answer, written as one line each: `status != "open"`, `messages[*].role contains "agent"`,
`ticket_id exists`, `latency_ms < 500`. A closed, small language, parsed (and so validated) at config load;
an evaluated condition keeps its resolved text, so a failure explains itself: `status != "open" (got "open")`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import regex

from canary.contract import Check, format_duration
from probes.jsonpath import is_missing, lookup, parse_path
from probes.patterns import RegexTimeout, compile_regex, search_now

_CONDITION = re.compile(
    r"^\s*(?P<path>\S+)\s+(?P<op>==|!=|<=|>=|<|>|not contains|contains|matches|in|not exists|exists)\s*(?P<value>.*?)\s*$"
)
_UNARY = ("exists", "not exists")
# How long one `matches` may search a value. Conditions are judged synchronously, on the event loop, so a pattern
# that backtracks without end on a value the platform sent holds every other probe for at most this long.
MATCH_SECONDS = 0.05


@dataclass(frozen=True)
class Condition:
    source: str
    steps: tuple[str | int, ...]
    op: str
    expected: Any
    pattern: regex.Pattern | None = None

    def evaluate(self, document: Any) -> Check:
        actual = lookup(document, self.steps)
        missing = is_missing(actual)
        if self.op == "exists":
            return Check(not missing, self.source)
        if self.op == "not exists":
            return Check(missing, f"{self.source} (got {_show(actual)})" if not missing else self.source)
        try:
            passed = not missing and _compare(self.op, actual, self.expected, self.pattern)
        except RegexTimeout as exc:  # undecided is not passed
            return Check(False, f"{self.source} (gave up after {format_duration(exc.seconds)}: the pattern backtracks "
                                f"too much on this {len(actual)}-character value)")
        return Check(passed, f"{self.source} (got {'missing' if missing else _show(actual)})")


def parse_condition(text: str) -> Condition:
    """Parse one condition; raise ValueError saying what is wrong with it."""
    match = _CONDITION.match(text)
    if match is None:
        raise ValueError(
            f"condition {text!r} is not understood; write PATH OP VALUE (OP one of ==, !=, <, <=, >, >=, "
            "contains, not contains, matches, in) or PATH exists / PATH not exists"
        )
    path, op, raw_value = match.group("path", "op", "value")
    steps = parse_path(path)
    if op in _UNARY:
        if raw_value:
            raise ValueError(f"condition {text!r}: '{op}' takes no value")
        return Condition(text.strip(), steps, op, None)
    try:
        expected = json.loads(raw_value)
    except ValueError:
        raise ValueError(f"condition {text!r}: the value must be JSON (strings in double quotes), got {raw_value!r}") from None
    pattern = None
    if op in ("<", "<=", ">", ">=") and not _is_number(expected):
        raise ValueError(f"condition {text!r}: '{op}' compares numbers")
    if op == "in" and not isinstance(expected, list):
        raise ValueError(f"condition {text!r}: 'in' takes a JSON array")
    if op == "matches":
        if not isinstance(expected, str):
            raise ValueError(f"condition {text!r}: 'matches' takes a regular expression as a JSON string")
        try:
            pattern = compile_regex(expected)
        except regex.error as exc:
            raise ValueError(f"condition {text!r}: not a valid regular expression: {exc}") from None
    return Condition(text.strip(), steps, op, expected, pattern)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _equal(a: Any, b: Any) -> bool:
    # JSON's true is not 1, though Python's True == 1.
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _compare(op: str, actual: Any, expected: Any, pattern: regex.Pattern | None) -> bool:
    if op == "==":
        return _equal(actual, expected)
    if op == "!=":
        return not _equal(actual, expected)
    if op in ("<", "<=", ">", ">="):
        if not _is_number(actual):
            return False
        return {"<": actual < expected, "<=": actual <= expected, ">": actual > expected, ">=": actual >= expected}[op]
    if op in ("contains", "not contains"):
        if isinstance(actual, list):
            found = any(_equal(item, expected) for item in actual)
        elif isinstance(actual, str) and isinstance(expected, str):
            found = expected in actual
        else:
            found = False
        return found if op == "contains" else not found
    if op == "matches":
        return isinstance(actual, str) and pattern is not None and search_now(pattern, actual, MATCH_SECONDS) is not None
    if op == "in":
        return any(_equal(actual, item) for item in expected)
    raise AssertionError(f"unhandled operator {op}")


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:79] + "…"
