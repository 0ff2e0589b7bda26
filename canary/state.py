"""The latest results of every configured probe, with the running totals the exporter and status page read.

The scheduler writes here and nothing else does; the exporter, the status page and `--once` only read.
A probe removed from the config is removed from here on reload, so its series vanish on the next scrape.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

from canary.contract import ProbeSettings, Result


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    wall_time: float
    success: bool
    reason: str
    duration_seconds: float
    message: str


class ProbeRecord:
    """Everything known about one probe: its settings, last result and counts since it was (re)configured."""

    __slots__ = (
        "settings", "latest", "last_run_time", "last_success_time", "runs", "failures",
        "bucket_counts", "latency_sum", "_history", "version", "last_lateness",
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
        # Plain tuples of plain values: the garbage collector stops tracking those, so 10,000 probes' full
        # histories (300,000 entries) add nothing to its passes; HistoryEntry objects would, by ~100 ms each.
        self._history: deque[tuple[float, bool, str, float, str]] = deque(maxlen=history)
        self.version = 0
        self.last_lateness = 0.0

    @property
    def history(self) -> list[HistoryEntry]:
        """Recent runs, oldest first."""
        return [HistoryEntry(*entry) for entry in self._history]


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
        keep_totals = buckets == self.buckets and history == self.history
        self.buckets, self.history = buckets, history
        records: dict[str, ProbeRecord] = {}
        for settings in probes:
            old = self._records.get(settings.name)
            if old is not None and keep_totals and old.settings == settings:
                records[settings.name] = old
            else:
                records[settings.name] = ProbeRecord(settings, len(buckets), history, self._reasons_for(settings.type))
        self._records = records

    def record(self, name: str, result: Result, wall_time: float, lateness: float = 0.0) -> None:
        record = self._records.get(name)
        if record is None:  # the probe was removed by a reload while it ran
            return
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
        record._history.append((wall_time, result.success, result.reason, result.duration_seconds, result.message))
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
