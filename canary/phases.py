"""Per-phase timing for one probe run, readable by the runner even when the run is cut short."""

from __future__ import annotations

from contextlib import contextmanager
from time import perf_counter
from typing import Iterator


class PhaseTimer:
    """Collects how long each named phase of a run took.

    The runner creates one per run and keeps a reference, so when a run times out it can still say which
    phase was in progress and report the phases that did finish.
    """

    __slots__ = ("phases", "current", "_started")

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.current: str | None = None
        self._started = 0.0

    def begin(self, name: str) -> None:
        self.current = name
        self._started = perf_counter()

    def end(self, name: str) -> None:
        if self.current == name:
            self.record(name, perf_counter() - self._started)
            self.current = None

    def record(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + max(seconds, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        except BaseException:
            # The run ended inside this phase (timeout, cancel, error): keep it as `current` so the
            # runner can say where, and still count the time spent in it.
            self.record(name, perf_counter() - self._started)
            raise
        self.end(name)
