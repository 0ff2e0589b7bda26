"""A tiny, closed JSON path: `status`, `channels.email`, `messages[0].role`, `messages[*].role`, `$.status`.

Parsed at config load. A `[*]` step maps over a list, so the path then yields a list of values.
"""

from __future__ import annotations

import re
from typing import Any

_STEP = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+|\*)\]|\[\"([^\"]+)\"\]")
WILDCARD = "*"
_MISSING = object()


def parse_path(path: str) -> tuple[str | int, ...]:
    """Split a path into keys and indexes; raise ValueError naming the first character not understood."""
    text = path.removeprefix("$")
    steps: list[str | int] = []
    position = 0
    while position < len(text):
        match = _STEP.match(text, position)
        if match is None or (position == 0 and text.startswith(".") and not path.startswith("$")):
            raise ValueError(f"JSON path {path!r} is not understood at position {position + len(path) - len(text)}")
        key, index, quoted = match.groups()
        if index is not None:
            steps.append(WILDCARD if index == WILDCARD else int(index))
        else:
            steps.append(key if key is not None else quoted)
        position = match.end()
    if not steps:
        raise ValueError(f"JSON path {path!r} is empty")
    return tuple(steps)


def lookup(document: Any, steps: tuple[str | int, ...]) -> Any:
    """The value at `steps`, or `MISSING` when any step does not exist; after `[*]`, the list of values found."""
    current = document
    for position, step in enumerate(steps):
        if step == WILDCARD:
            if not isinstance(current, list):
                return _MISSING
            found = [lookup(item, steps[position + 1 :]) for item in current]
            return [value for value in found if value is not _MISSING]
        if isinstance(step, int) and isinstance(current, list) and step < len(current):
            current = current[step]
        elif isinstance(step, str) and isinstance(current, dict) and step in current:
            current = current[step]
        else:
            return _MISSING
    return current


def is_missing(value: Any) -> bool:
    return value is _MISSING
