"""The sandbox's switchboard of faults: each component declares its faults with defaults (and allowed values)."""

from __future__ import annotations

import copy
from typing import Any

from aiohttp import web

# How long a "hang" fault holds a request: longer than any probe timeout, short enough to end by itself.
HANG_SECONDS = 300.0


class FaultBoard:
    def __init__(self) -> None:
        self._defaults: dict[str, Any] = {}
        self._choices: dict[str, tuple[str, ...]] = {}
        self._values: dict[str, Any] = {}

    def declare(self, defaults: dict[str, Any], choices: dict[str, tuple[str, ...]]) -> None:
        clash = set(defaults) & set(self._defaults)
        if clash:
            raise ValueError(f"fault names declared twice: {', '.join(sorted(clash))}")
        self._defaults.update(copy.deepcopy(defaults))
        self._choices.update(choices)
        self._values.update(copy.deepcopy(defaults))

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def update(self, changes: dict[str, Any]) -> None:
        """Apply all changes or none; dict-valued faults are merged key by key."""
        staged = copy.deepcopy(self._values)
        for key, value in changes.items():
            if key not in self._defaults:
                raise ValueError(f"unknown fault {key!r} (known: {', '.join(sorted(self._defaults))})")
            default = self._defaults[key]
            if key in self._choices and value not in self._choices[key]:
                raise ValueError(f"fault {key!r} must be one of {', '.join(self._choices[key])}")
            if isinstance(default, dict):
                if not isinstance(value, dict):
                    raise ValueError(f"fault {key!r} takes an object")
                staged[key].update(value)
            elif isinstance(default, bool):
                staged[key] = bool(value)
            elif isinstance(default, (int, float)):
                staged[key] = min(float(value), HANG_SECONDS)
            else:
                staged[key] = str(value)
        self._values = staged

    def reset(self) -> None:
        self._values = copy.deepcopy(self._defaults)

    def as_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._values)


FAULTS = web.AppKey("faults", FaultBoard)
