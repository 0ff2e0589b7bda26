"""How far behind the event loop runs, so the canary can tell its own slowness from a slow target; and `Pacer`,
which keeps the canary's own long pieces of work (a reload of 10,000 probes) from putting it behind.

When the process cannot keep up (too many probes for its CPU, or other work on the machine taking the CPU), every
callback waits in the loop's queue: a run that would take 2 ms takes seconds and times out, and every channel
would page. A timer ticks every TICK seconds and measures how late it fired: that lag is what every run is waiting
for too. From it the scheduler sheds slots rather than start runs that cannot finish, and calls a run that timed out
while the loop was behind `starved` rather than failed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import replace
from time import perf_counter
from typing import NamedTuple

from canary.contract import Result, format_duration

TICK = 0.1
# The longest a Pacer's caller holds the loop before it lets due work run, and the most items (tasks started or
# cancelled, records built) it handles at once: their own follow-up runs in the loop's next pass.
SLICE_SECONDS = 0.002
SLICE_ITEMS = 50
WINDOW = 15.0  # the gauges cover this long: one scrape interval of a usual Prometheus
# A run makes a few dozen hand-overs through the loop at most (connect, TLS, write, headers, body, redirects). When a
# slot comes 1/SHED_PART of the probe's timeout late and the loop has been that far behind on average for the last
# second (saturated, not one stall), a run started then would spend a good share of the timeout queueing: the slot is
# skipped. A run that timed out while the loop was behind by 1/STARVED_PART of its
# timeout on average spent a fair share of it queueing: its timeout says nothing about the target.
SHED_PART, SHED_FLOOR = 20, 0.1
STARVED_PART, STARVED_FLOOR = 40, 0.05
# Reasons a run ends with because it took too long: with a loop that was behind meanwhile, the run was starved.
STARVABLE = frozenset({"timeout", "slow"})


def shed_after(timeout: float) -> float:
    """How late a slot may start, and how far behind the loop may stay, before the slot is skipped (0.25 s for a
    5 s timeout)."""
    return max(timeout / SHED_PART, SHED_FLOOR)


def starved_after(timeout: float) -> float:
    """The average lag during a timed-out run above which it is starved, not failed (0.125 s for a 5 s timeout)."""
    return max(timeout / STARVED_PART, STARVED_FLOOR)


class Pacer:
    """Cuts a long piece of work on the loop into slices, letting the loop run what is due in between.

    A reload of 10,000 probes builds, starts and stops 10,000 of each and makes 10,000 records: done in one go, that
    holds the loop for most of a second and every probe due meanwhile starts that late. Call `step()` after each
    item."""

    def __init__(self) -> None:
        self._since = perf_counter()
        self._count = 0

    async def step(self) -> None:
        self._count += 1
        if self._count >= SLICE_ITEMS or perf_counter() - self._since >= SLICE_SECONDS:
            await asyncio.sleep(0)
            self._since, self._count = perf_counter(), 0


async def release(items: list[object]) -> None:
    """Drops `items` (the list's references to them) a slice at a time, emptying the list.

    Whatever only they kept alive is freed as each goes: 10,000 replaced probes, records or settings freed in one go
    take 10-30 ms, which the probes due meanwhile would wait for."""
    items.reverse()
    pacer = Pacer()
    while items:
        items.pop()
        await pacer.step()


class Reading(NamedTuple):
    behind: float  # seconds the loop was behind, summed over every tick so far
    ticks: int


class LoopMonitor:
    """Ticks on the running loop and keeps the lag of each tick for the last WINDOW seconds.

    A `reading()` is a running total (the ticks so far and the sum of their lags); from one taken when a run started,
    `average_lag(reading)` says how far behind the loop was on average while it ran, the tick overdue now included."""

    def __init__(self, tick: float = TICK, window: float = WINDOW) -> None:
        self._loop = asyncio.get_running_loop()
        self._tick = tick
        self.window = window
        self._behind = 0.0
        self._count = 0
        self._due = self._loop.time() + tick
        self._since = self._loop.time()
        self._ticks: deque[tuple[float, float, float]] = deque()  # (when, behind after it, its lag)
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._handle is None:
            self._since = self._loop.time()
            self._due = self._since + self._tick
            self._handle = self._loop.call_at(self._due, self._on_tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _on_tick(self) -> None:
        now = self._loop.time()
        lag = max(now - self._due, 0.0)
        self._behind += lag
        self._count += 1
        self._ticks.append((now, self._behind, lag))
        while self._ticks and self._ticks[0][0] < now - self.window:
            self._ticks.popleft()
        self._due = now + self._tick
        self._handle = self._loop.call_at(self._due, self._on_tick)

    def _overdue(self) -> float:
        return max(self._loop.time() - self._due, 0.0) if self._handle is not None else 0.0

    def reading(self) -> Reading:
        return Reading(self._behind, self._count)

    def average_lag(self, since: Reading) -> float:
        """How far behind the loop was, on average, over the ticks since `since` (and the one overdue now)."""
        overdue = self._overdue()
        ticks = self._count - since.ticks + (1 if overdue > 0 else 0)
        return (self._behind - since.behind + overdue) / ticks if ticks else 0.0

    def recent_lag(self, within: float = 1.0) -> float:
        """How far behind the loop was on average over the last `within` seconds' ticks (and the one overdue now):
        high when it stays behind, not after one short stall."""
        since = self._loop.time() - within
        lags = [lag for when, _, lag in self._ticks if when >= since]
        overdue = self._overdue()
        if overdue > 0:
            lags.append(overdue)
        return sum(lags) / len(lags) if lags else 0.0

    def behind(self) -> float:
        """Seconds spent behind since the start, the current overdue tick included."""
        return self._behind + self._overdue()

    def lag(self, within: float | None = None) -> float:
        """The longest the loop was behind in the last `within` (WINDOW) seconds, the current overdue tick included."""
        since = self._loop.time() - (self.window if within is None else within)
        return max([self._overdue(), *(lag for when, _, lag in self._ticks if when >= since)])

    def ratio(self) -> float:
        """How saturated the loop was over the last WINDOW seconds, from 0 (every tick on time) towards 1: the share
        of that time spent waiting for late ticks. A loop steadily behind by one TICK is at 0.5."""
        now = self._loop.time()
        start = max(now - self.window, self._since)
        before = next((behind - lag for when, behind, lag in self._ticks if when >= start), self._behind)
        elapsed = now - start
        return min(max((self.behind() - before) / elapsed, 0.0), 1.0) if elapsed > 0 else 0.0


def judge(result: Result, timeout: float, monitor: LoopMonitor, since: Reading) -> Result:
    """`result`, or a `starved` one when it timed out (or was too slow) while the loop was, on average since the run
    began (`since`), behind by more than `starved_after(timeout)`: then it says nothing about the target."""
    if result.reason not in STARVABLE:
        return result
    lag = monitor.average_lag(since)
    if lag < starved_after(timeout):
        return result
    return replace(result, success=False, reason="starved", gauges=(), message=(
        f"{result.message}; but the canary itself was {readable_lag(lag)} behind on average meanwhile "
        "(its event loop was saturated), so this says nothing about the target"))


def readable_lag(seconds: float) -> str:
    return format_duration(round(seconds, 1) if seconds >= 1 else seconds)
