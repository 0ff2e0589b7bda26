"""Durations as people write them in config ("30s", "2m", "1h30m", "250ms"), parsed to float seconds."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """Parse a Go-style duration string into seconds; raise ValueError with a readable reason."""
    if not isinstance(text, str):
        raise ValueError(f"expected a duration string such as \"30s\" or \"2m\", got {type(text).__name__}")
    cleaned = text.strip()
    if not cleaned:
        raise ValueError("expected a duration such as \"30s\" or \"2m\", got an empty string")
    position, total = 0, 0.0
    for match in _PART.finditer(cleaned):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(cleaned):
        raise ValueError(f"{text!r} is not a duration (use a number and a unit: ms, s, m, h, d, e.g. \"30s\")")
    return total


def format_duration(seconds: float) -> str:
    """The shortest readable form, for messages and the status page."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:g}s"
    if seconds < 7200:
        return f"{seconds / 60:g}m"
    return f"{seconds / 3600:g}h"
