"""The latest results of every configured probe, with the running totals the exporter and status page read.

The scheduler writes here and nothing else does; the exporter, the status page and `--once` only read.
A probe removed from the config is removed from here on reload, so its series vanish on the next scrape.
"""

from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from canary.contract import ProbeSettings, Result


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    wall_time: float
    success: bool
    reason: str
    duration_seconds: float
    message: str


class RunHistory:
    """The last `size` runs of one probe, compact: times and durations in two flat arrays, and outcomes where a
    run that ends like the one before shares its (success, reason, message) tuple.

    As a deque of 5-tuples, 30 runs cost ~6 KB per probe (60 MB at 10,000 probes); like this ~1 KB, and nothing
    but one list is ever walked by the garbage collector."""

    __slots__ = ("_times", "_durations", "_outcomes", "_next", "_count")

    def __init__(self, size: int) -> None:
        self._times = array("d", bytes(8 * size))
        self._durations = array("d", bytes(8 * size))
        self._outcomes: list[tuple[bool, str, str] | None] = [None] * size
        self._next = 0
        self._count = 0

    def append(self, wall_time: float, success: bool, reason: str, duration: float, message: str) -> None:
        size = len(self._outcomes)
        outcome = (success, reason, message)
        previous = self._outcomes[self._next - 1] if self._count else None
        if previous == outcome:
            outcome = previous  # type: ignore[assignment]
        index = self._next
        self._times[index], self._durations[index], self._outcomes[index] = wall_time, duration, outcome
        self._next = (index + 1) % size
        self._count = min(self._count + 1, size)

    def entries(self) -> list[HistoryEntry]:
        """Oldest first."""
        size = len(self._outcomes)
        first = (self._next - self._count) % size
        entries = []
        for offset in range(self._count):
            index = (first + offset) % size
            success, reason, message = self._outcomes[index]  # type: ignore[misc]
            entries.append(HistoryEntry(self._times[index], success, reason, self._durations[index], message))
        return entries


class ProbeRecord:
    """Everything known about one probe: its settings, last result and counts since it was (re)configured."""

    __slots__ = (
        "settings", "latest", "last_run_time", "last_success_time", "runs", "failures",
        "bucket_counts", "latency_sum", "_history", "version", "last_lateness", "starved", "last_starved",
        "last_starved_time",
    )

    def __init__(self, settings: ProbeSettings, bucket_count: int, history: int, reasons: Iterable[str] = ()) -> None:
        self.settings = settings
        self.latest: Result | None = None
        self.last_run_time = 0.0
        self.last_success_time = 0.0
        self.runs = {"success": 0, "failure": 0}
        # Every reason the probe can fail with starts at 0, so `increase()` sees the first failure too.
        self.failures: dict[str, int] = dict.fromkeys(reasons, 0)
        self.bucket_counts = [0] * (bucket_count + 1)  # the last one is +Inf
        self.latency_sum = 0.0
        self._history = RunHistory(history)
        self.version = 0
        self.last_lateness = 0.0
        # Runs the canary's own overload starved (reason "starved"): no verdict, so none of the above changes.
        self.starved = 0
        self.last_starved: Result | None = None  # the latest of them, while no verdict has come since
        self.last_starved_time = 0.0

    @property
    def history(self) -> list[HistoryEntry]:
        """Recent runs, oldest first."""
        return self._history.entries()


@dataclass(frozen=True, slots=True)
class ChannelState:
    """One channel: `up` from the probes and the platform together; `platform_up` what the platform itself reports
    (None when no probe reads its report), so a rule can tell a failing probe from the platform's own word."""

    up: bool
    importance: str  # "critical" when any probe speaking for the channel is critical, else "warning"
    platform_up: bool | None = None


Listener = Callable[[ProbeRecord], None]


class ResultStore:
    def __init__(
        self, buckets: tuple[float, ...], history: int, reasons_for: Callable[[str], Iterable[str]] = lambda _: ()
    ) -> None:
        """`reasons_for(type)` names the failure reasons a probe type can return (their counters start at 0)."""
        self.buckets = buckets
        self.history = history
        self._reasons_for = reasons_for
        self._records: dict[str, ProbeRecord] = {}
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        """Called after each recorded result, e.g. to pre-render that probe's metrics off the scrape path."""
        self._listeners.append(listener)

    def sync(self, probes: Iterable[ProbeSettings], buckets: tuple[float, ...], history: int) -> None:
        """Match the store to a newly loaded config; probes whose settings did not change keep their totals."""
        pending = self.prepare(probes, buckets, history)
        for _ in pending.steps():
            pass
        pending.apply()

    def prepare(self, probes: Iterable[ProbeSettings], buckets: tuple[float, ...], history: int) -> "PendingSync":
        """`sync` in two steps: the new records are made a few at a time (`steps()`, which yields each new one), and
        swapped in at once (`apply()`). 10,000 changed probes take 0.1-0.3 s to make records for, which a reload
        spreads between the runs that are due rather than hold the event loop for."""
        return PendingSync(self, tuple(probes), buckets, history)

    def record(self, name: str, result: Result, wall_time: float, lateness: float = 0.0) -> None:
        record = self._records.get(name)
        if record is None:  # the probe was removed by a reload while it ran
            return
        if result.reason == "starved":  # no verdict: the probe's state, counts and history stay as they were
            record.starved += 1
            record.last_starved, record.last_starved_time = result, wall_time
            return
        record.last_starved = None
        record.latest = result
        record.last_run_time = wall_time
        record.last_lateness = lateness
        if result.success:
            record.last_success_time = wall_time
            record.runs["success"] += 1
        else:
            record.runs["failure"] += 1
            record.failures[result.reason] = record.failures.get(result.reason, 0) + 1
        record.bucket_counts[bisect.bisect_left(self.buckets, result.duration_seconds)] += 1
        record.latency_sum += result.duration_seconds
        record._history.append(wall_time, result.success, result.reason, result.duration_seconds, result.message)
        record.version += 1
        for listener in self._listeners:
            listener(record)

    def get(self, name: str) -> ProbeRecord | None:
        return self._records.get(name)

    def records(self) -> list[ProbeRecord]:
        return list(self._records.values())

    def channel_states(self) -> dict[str, bool]:
        """Channel → up (see `channels`)."""
        return {name: state.up for name, state in self.channels().items()}

    def channels(self) -> dict[str, ChannelState]:
        """Every channel a probe belongs to or saw the platform report on, with its state.

        A channel is up when every probe of it passed its last run and no probe saw the platform report it down; it is
        critical when any probe that speaks for it is. A channel whose probes have not run yet is left out rather than
        guessed."""
        up: dict[str, bool] = {}
        critical: dict[str, bool] = {}
        platform: dict[str, bool] = {}
        for record in self._records.values():
            result = record.latest
            if result is None:
                continue
            is_critical = record.settings.severity == "critical"
            own = record.settings.channel
            up[own] = up.get(own, True) and result.success
            critical[own] = critical.get(own, False) or is_critical
            for reported, reported_up in result.channels.items():
                up[reported] = up.get(reported, True) and reported_up
                critical[reported] = critical.get(reported, False) or is_critical
                platform[reported] = platform.get(reported, True) and reported_up
        return {
            name: ChannelState(up[name], "critical" if critical[name] else "warning", platform.get(name))
            for name in up
        }


class PendingSync:
    """A sync of the store, made a record at a time and applied at once (see ResultStore.prepare)."""

    def __init__(self, store: ResultStore, probes: tuple[ProbeSettings, ...], buckets: tuple[float, ...], history: int) -> None:
        self._store = store
        self._probes = probes
        self._buckets = buckets
        self._history = history
        self._records: dict[str, ProbeRecord] = {}

    def steps(self) -> Iterator[ProbeRecord]:
        """Makes the records; yields each new one (a probe whose settings did not change keeps its record)."""
        store = self._store
        keep_totals = self._buckets == store.buckets and self._history == store.history
        for settings in self._probes:
            old = store._records.get(settings.name)
            if old is not None and keep_totals and old.settings == settings:
                self._records[settings.name] = old
            else:
                record = ProbeRecord(settings, len(self._buckets), self._history, store._reasons_for(settings.type))
                self._records[settings.name] = record
                yield record

    def apply(self) -> list[ProbeRecord]:
        """Swaps the new records in. Returns the records it replaced, for the caller to free at its own pace."""
        store = self._store
        replaced = [record for name, record in store._records.items() if self._records.get(name) is not record]
        store.buckets, store.history, store._records = self._buckets, self._history, self._records
        return replaced
