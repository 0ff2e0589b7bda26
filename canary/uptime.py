"""Uptime over 1 h, 24 h and 7 d for every probe, from hourly buckets that outlive a restart.

The status page's recent runs (30 by default) say nothing about yesterday, and a restart forgets even those. So each
probe keeps compact hourly buckets here: for each clock hour, how many runs, how many failed, and the sum of their
durations. 168 buckets (7 days) a probe at most, in flat typed arrays that grow by one bucket an hour and are then
overwritten in place as the hours come round: 20 bytes a probe in its first hour, never more than 3.4 KB.

Fed by the ResultStore's listener hook, never by the scheduler. Saved to `<state_dir>/uptime.json` (`[daemon]
state_dir`, `--state.dir`), written to a temporary file and renamed over the old one, so a crash mid-write leaves the
last good file: every minute from a background task when anything changed (the write runs in a worker thread, off
the event loop and the scrape path) and once more on shutdown. Loaded on start; a missing, unreadable, corrupt or
foreign file is logged and ignored, never fatal. A probe no longer configured loses its buckets at the next load of
the config.

A window's figure is an estimate: every bucket wholly inside the window counts fully, and the bucket the window
starts in counts in proportion to its overlap (as if its runs were spread evenly through the hour), so "1 h" at
10:15 is the runs since 10:00 plus three quarters of the 09:00 bucket. "7 d" reaches as far back as the buckets do:
the current hour and the 167 before it.

The file is JSON with each probe's four arrays as base64 of their little-endian bytes (int32 hour numbers since
the epoch, uint32 runs, uint32 failures, float64 latency sums), as many buckets as the probe has (version 2; version
1 files, with all 168 slots, are still read): 10,000 probes' full week is about 45 MB, their first hour 2 MB. The
snapshot is taken on the loop a slice of probes at a time, and the file is encoded and written a probe at a time in a
worker thread, so neither the loop nor the memory ever holds the whole file at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import operator
import os
import sys
import threading
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from canary.atomic_file import os_reason, write_atomically
from canary.state import ProbeRecord

log = logging.getLogger("canary.uptime")

HOUR = 3600.0
BUCKETS = 168  # 7 days of hours
WINDOWS: dict[str, float] = {"1h": HOUR, "24h": 24 * HOUR, "7d": 7 * 24 * HOUR}
FILE_NAME = "uptime.json"
FORMAT = "channel-canary/uptime"
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)  # 1: every array holds all BUCKETS slots, empty ones included
SAVE_EVERY = 60.0
SNAPSHOT_SLICE = 500  # probes copied per turn of the event loop while a periodic save takes its snapshot
# The arrays as the file names them, with their element types; every one holds at most BUCKETS elements.
_ARRAYS = (("hours", "i"), ("runs", "I"), ("failures", "I"), ("latency_sum", "d"))


@dataclass(frozen=True, slots=True)
class Availability:
    """Runs and failures in one window (fractional: the oldest bucket counts in part), and their latency sum."""

    runs: float = 0.0
    failures: float = 0.0
    latency_sum: float = 0.0

    @property
    def ratio(self) -> float | None:
        """Share of passing runs; None without runs."""
        return None if self.runs <= 0 else min(1.0, max(0.0, 1.0 - self.failures / self.runs))

    @property
    def mean_latency(self) -> float | None:
        return None if self.runs <= 0 else self.latency_sum / self.runs

    def __add__(self, other: "Availability") -> "Availability":
        return Availability(self.runs + other.runs, self.failures + other.failures, self.latency_sum + other.latency_sum)

    def as_json(self) -> dict[str, float | int | None]:
        return {
            "ratio": None if self.ratio is None else round(self.ratio, 6),
            "runs": round(self.runs),
            "failures": round(self.failures),
            "mean_latency_seconds": None if self.mean_latency is None else round(self.mean_latency, 6),
        }


class _Buckets:
    """One probe's hourly buckets: entry i holds hour `hours[i]`'s runs, failures and latency sum.

    Flat typed arrays rather than an object a bucket: 20 bytes a bucket, and nothing for the garbage collector to
    walk. They grow by one entry for each new hour up to BUCKETS; then a new hour takes the oldest hour's entry."""

    __slots__ = ("hours", "runs", "failures", "latency_sum", "latest")

    def __init__(self) -> None:
        for name, code in _ARRAYS:
            setattr(self, name, array(code))
        self.latest = -1  # the entry of the newest hour, where nearly every run lands

    def add(self, hour: int, runs: int, failures: int, latency_sum: float) -> None:
        hours = self.hours
        index = self.latest
        if index < 0 or hours[index] != hour:
            newest = hours[index] if index >= 0 else -1
            try:
                index = hours.index(hour)
            except ValueError:
                if hour <= newest - BUCKETS:
                    return  # outside the 168 hours that end with the newest: more than 7 days ago (or a clock jump)
                expired = next((i for i, held in enumerate(hours) if held <= hour - BUCKETS), None)
                if expired is not None:  # an hour that left the 7 days gives its entry to the new one
                    index = expired
                    hours[index], self.runs[index], self.failures[index], self.latency_sum[index] = hour, 0, 0, 0.0
                else:  # fewer than 168 entries: a full ring always has one expired by a newer hour
                    index = len(hours)
                    hours.append(hour)
                    self.runs.append(0)
                    self.failures.append(0)
                    self.latency_sum.append(0.0)
            if hour > newest:
                self.latest = index
        self.runs[index] += runs
        self.failures[index] += failures
        self.latency_sum[index] += latency_sum

    def windows(self, now: float) -> dict[str, Availability]:
        """Every window of WINDOWS, in one pass over the slots."""
        starts = [(window, now - seconds) for window, seconds in WINDOWS.items()]
        sums = {window: [0.0, 0.0, 0.0] for window in WINDOWS}
        for slot, runs in enumerate(self.runs):
            if not runs:
                continue
            bucket_start = self.hours[slot] * HOUR
            bucket_end = bucket_start + HOUR
            for window, start in starts:
                if bucket_end <= start:
                    continue
                weight = 1.0 if bucket_start >= start else (bucket_end - start) / HOUR
                total = sums[window]
                total[0] += weight * runs
                total[1] += weight * self.failures[slot]
                total[2] += weight * self.latency_sum[slot]
        return {window: Availability(*total) for window, total in sums.items()}

    def copy(self) -> "_Buckets":
        twin = _Buckets.__new__(_Buckets)
        for name, code in _ARRAYS:
            setattr(twin, name, array(code, getattr(self, name)))
        twin.latest = self.latest
        return twin

    def encode(self) -> dict[str, str]:
        encoded = {}
        for name, _ in _ARRAYS:
            values = getattr(self, name)
            if sys.byteorder != "little":
                values = array(values.typecode, values)
                values.byteswap()
            encoded[name] = base64.b64encode(values.tobytes()).decode("ascii")
        return encoded

    @classmethod
    def decode(cls, document: Any, version: int = FORMAT_VERSION) -> "_Buckets":
        """Buckets from the file's form of them; ValueError saying what is wrong with anything else."""
        if not isinstance(document, dict) or set(document) != {name for name, _ in _ARRAYS}:
            raise ValueError(f"expected an object with {', '.join(name for name, _ in _ARRAYS)}")
        read: dict[str, array[Any]] = {}
        for name, code in _ARRAYS:
            values = array(code)
            try:
                raw = base64.b64decode(document[name], validate=True)
            except (TypeError, binascii.Error):
                raise ValueError(f"{name} is not base64") from None
            if version == 1 and len(raw) != values.itemsize * BUCKETS:
                raise ValueError(f"{name} does not hold {BUCKETS} values")
            if len(raw) % values.itemsize or len(raw) > values.itemsize * BUCKETS:
                raise ValueError(f"{name} does not hold at most {BUCKETS} whole values")
            values.frombytes(raw)
            if sys.byteorder != "little":
                values.byteswap()
            read[name] = values
        hours, runs, failures, latency = read["hours"], read["runs"], read["failures"], read["latency_sum"]
        if len({len(values) for values in read.values()}) != 1:
            raise ValueError("its arrays differ in length")
        if not hours:
            return cls()
        if min(hours) < 0 or not all(map(operator.ge, runs, failures)):
            raise ValueError("a bucket has a negative hour, or more failures than runs")
        if min(latency) < 0 or not math.isfinite(sum(latency)):
            raise ValueError("a bucket has a negative or non-finite latency sum")
        buckets = cls()
        # Added bucket by bucket (in the saved order, so figures add up exactly as before the save), so a repeated
        # hour adds up and no more than the 168 hours that end with the newest are kept.
        for index in range(len(hours)):
            if runs[index]:
                buckets.add(hours[index], runs[index], failures[index], latency[index])
        return buckets


class UptimeBook:
    """Every probe's hourly buckets; `path` is the file they are saved to, or None to keep them in memory only."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._probes: dict[str, _Buckets] = {}
        self._changed = False
        self._save_failed: str | None = None  # the last save error, logged once until a save succeeds again
        self._writing = threading.Lock()  # a shutdown save waits for a periodic one still writing in its thread

    @classmethod
    def in_directory(cls, state_dir: str | os.PathLike[str] | None) -> "UptimeBook":
        return cls(None if state_dir is None else Path(state_dir) / FILE_NAME)

    # -- recording ---------------------------------------------------------------------------------------------

    def observe(self, record: ProbeRecord) -> None:
        """The ResultStore listener: count the run just recorded."""
        result = record.latest
        if result is not None:
            self.add(record.settings.name, record.last_run_time, result.success, result.duration_seconds)

    def add(self, name: str, wall_time: float, success: bool, duration_seconds: float) -> None:
        """Count one run of `name` that ended at `wall_time` (Unix time)."""
        if not math.isfinite(wall_time) or wall_time < 0:
            return
        buckets = self._probes.get(name)
        if buckets is None:
            buckets = self._probes[name] = _Buckets()
        buckets.add(int(wall_time // HOUR), 1, 0 if success else 1, max(duration_seconds, 0.0))
        self._changed = True

    def keep(self, names: Iterable[str]) -> None:
        """Drop the buckets of every probe not in `names` (called with the running probes after each config load)."""
        wanted = set(names)
        for name in [name for name in self._probes if name not in wanted]:
            del self._probes[name]
            self._changed = True

    # -- reading -----------------------------------------------------------------------------------------------

    def probe(self, name: str, now: float) -> dict[str, Availability]:
        """The probe's figures for every window of WINDOWS (empty ones when it has no buckets)."""
        buckets = self._probes.get(name)
        return buckets.windows(now) if buckets is not None else dict.fromkeys(WINDOWS, Availability())

    @staticmethod
    def combine(figures: Iterable[dict[str, Availability]]) -> dict[str, Availability]:
        """Several probes' figures together (runs and failures added up), e.g. all the probes of one channel."""
        total = dict.fromkeys(WINDOWS, Availability())
        for each in figures:
            total = {window: total[window] + each[window] for window in WINDOWS}
        return total

    def names(self) -> list[str]:
        return list(self._probes)

    # -- the file ----------------------------------------------------------------------------------------------

    def load(self) -> bool:
        """Read the saved buckets, if any; returns whether a file was used. A bad file is logged, never raised."""
        if self.path is None:
            return False
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            log.info("no uptime history at %s yet; starting empty", self.path)
            return False
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read the uptime history %s (%s); starting empty", self.path, os_reason(exc))
            return False
        try:
            probes = _parse(text)
        except ValueError as exc:
            log.warning("ignoring the uptime history %s: %s; starting empty (the next save replaces it)", self.path, exc)
            return False
        self._probes.update(probes)
        log.info("loaded the uptime history of %d probes from %s", len(probes), self.path)
        return True

    def snapshot(self) -> dict[str, _Buckets]:
        """A copy of every probe's buckets, cheap enough to take on the event loop (four memory copies a probe)."""
        self._changed = False
        return {name: buckets.copy() for name, buckets in self._probes.items()}

    async def _snapshot_in_slices(self) -> dict[str, _Buckets]:
        """`snapshot`, a slice of probes per turn of the loop: 10,000 probes' copies in one go would hold it ~20 ms."""
        self._changed = False
        snapshot: dict[str, _Buckets] = {}
        names = list(self._probes)
        for start in range(0, len(names), SNAPSHOT_SLICE):
            for name in names[start:start + SNAPSHOT_SLICE]:
                buckets = self._probes.get(name)
                if buckets is not None:  # not dropped by a reload meanwhile
                    snapshot[name] = buckets.copy()
            await asyncio.sleep(0)
        return snapshot

    def save(self) -> bool:
        """Write the buckets now, atomically; returns whether it worked (a failure is logged, never raised)."""
        if self.path is None:
            return False
        return self._write(self.snapshot())

    async def save_every(self, seconds: float = SAVE_EVERY) -> None:
        """Save whenever something changed, every `seconds`, until cancelled. The snapshot is taken on the loop;
        encoding and writing happen in a worker thread, so a scrape or a probe run never waits for the disk."""
        if self.path is None:
            return
        while True:
            await asyncio.sleep(seconds)
            if not self._changed:
                continue
            try:
                await asyncio.to_thread(self._write, await self._snapshot_in_slices())
            except Exception:  # a bug here must not end the saving for the rest of the daemon's life
                log.exception("saving the uptime history failed")

    def _write(self, snapshot: dict[str, _Buckets]) -> bool:
        with self._writing:
            return self._write_file(snapshot)

    def _write_file(self, snapshot: dict[str, _Buckets]) -> bool:
        assert self.path is not None
        header = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "bucket_seconds": int(HOUR)},
                            separators=(",", ":"))

        def pieces() -> Iterable[str]:
            # A probe at a time: the whole document as one string would be 45 MB for 10,000 probes' week, kept by
            # the allocator long after the save.
            yield header[:-1] + ',"probes":{'
            for position, (name, buckets) in enumerate(snapshot.items()):
                yield ("," if position else "") + json.dumps(name) + ":" + json.dumps(buckets.encode(), separators=(",", ":"))
            yield "}}"

        try:
            write_atomically(self.path, pieces())
        except OSError as exc:
            why = os_reason(exc)
            if why != self._save_failed:
                log.warning("cannot save the uptime history to %s (%s); it stays in memory and is retried", self.path, why)
            self._save_failed = why
            self._changed = True  # try again at the next tick
            return False
        if self._save_failed is not None:
            log.info("uptime history saved to %s again", self.path)
            self._save_failed = None
        return True


def _parse(text: str) -> dict[str, _Buckets]:
    """Every probe's buckets from a saved file; ValueError saying what is wrong with anything else."""
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f'not a channel-canary uptime file (no "format": "{FORMAT}")')
    version = document.get("version")
    if version not in READS_VERSIONS or document.get("bucket_seconds") != int(HOUR):
        raise ValueError(
            f"written in another layout (version {version!r}, bucket_seconds {document.get('bucket_seconds')!r}; "
            f"this daemon reads versions {', '.join(map(str, READS_VERSIONS))}, {int(HOUR)})"
        )
    probes = document.get("probes")
    if not isinstance(probes, dict):
        raise ValueError('"probes" is not an object')
    parsed = {}
    for name, buckets in probes.items():
        try:
            parsed[name] = _Buckets.decode(buckets, version)
        except ValueError as exc:
            raise ValueError(f"probe {name[:64]!r}: {exc}") from None
    return parsed
