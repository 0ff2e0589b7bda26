"""The object ledger: a durable note of every object a probe's run created on the platform, until it is removed.

A transaction's cleanup survives failures, timeouts and SIGTERM, but not a `kill -9`, an OOM kill or a lost node.
So a probe that creates something (a synthetic ticket) records it here the moment it learns the object's id, and
settles the entry once its cleanup removed it. Whatever is left (the process died, or the platform refused the
delete) is a leftover, which the janitor (canary/janitor.py) removes later, from this process or the next.

One SQLite file, `<state_dir>/ledger.sqlite` (stdlib sqlite3, WAL, synchronous=FULL: an entry whose `record`
returned is on disk, whatever happens to the process next). An entry holds the probe's name, the run's id, the values
the cleanup steps need (never a secret: the probe leaves those out), when it was made and which process made it;
never a request, a header or a credential. The cleanup requests are rebuilt from the current config when a leftover
is removed. Every read is served from a copy in memory; every write goes to the file in one worker thread, so the
event loop never waits for the disk, and writes stay in order (a `settle` never overtakes its `record`). A file that
cannot be opened is logged and replaced by an in-memory database: leftovers are still retried while the process
lives, and the gauge still counts them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from canary.contract import Probe, ProbeSettings

log = logging.getLogger("canary.ledger")

FILE_NAME = "ledger.sqlite"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    probe TEXT NOT NULL,
    run_id TEXT NOT NULL,
    variables TEXT NOT NULL,
    created REAL NOT NULL,
    owner TEXT NOT NULL,
    PRIMARY KEY (probe, run_id)
)
"""
Key = tuple[str, str]  # (probe, run_id)


@dataclass
class Entry:
    """One object some run created and nobody has seen removed yet."""

    probe: str
    run_id: str
    variables: dict[str, str]
    created: float  # Unix time of the first record
    owner: str  # the process that made it (a random id per process)
    attempts: int = 0  # removals tried by this process
    last_attempt: float = field(default=0.0)  # monotonic

    @property
    def key(self) -> Key:
        return (self.probe, self.run_id)


class Ledger:
    """The ledger of one state directory; `Ledger(None)` keeps it in memory only."""

    def __init__(self, path: Path | None) -> None:
        self.owner = secrets.token_hex(8)
        self._entries: dict[Key, Entry] = {}
        self._in_flight: set[Key] = set()  # entries of runs of this process that have not settled yet
        self._failing: str | None = None  # the last write error, logged once until a write succeeds again
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self.path, self._db = _open(path)
        for probe, run_id, variables, created, owner in self._db.execute(
            "SELECT probe, run_id, variables, created, owner FROM objects"
        ):
            try:
                values = json.loads(variables)
            except ValueError:
                values = None
            if not isinstance(values, dict):
                log.warning("ledger %s: the entry of probe %s, run %s, is unreadable; it stays counted", self.path, probe, run_id)
                values = {}
            self._entries[(probe, run_id)] = Entry(probe, run_id, {str(k): str(v) for k, v in values.items()}, created, owner)
        if self._entries:
            log.info("ledger %s holds %d objects earlier runs left behind; removing them", self.path, len(self._entries))

    @classmethod
    def in_directory(cls, directory: Path | None) -> "Ledger":
        return cls(None if directory is None else directory / FILE_NAME)

    def for_probe(self, name: str) -> "ProbeLedger":
        """What a probe named `name` is given: record and settle its own runs' entries."""
        return ProbeLedger(self, name)

    # -- writing ---------------------------------------------------------------------------------------------------

    async def record(self, probe: str, run_id: str, variables: Mapping[str, str], in_flight: bool = True) -> None:
        """Add or update an entry; returns once it is on disk (or the disk failed, which is logged)."""
        key = (probe, run_id)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = Entry(probe, run_id, dict(variables), time.time(), self.owner)
        else:
            entry.variables.update(variables)
        if in_flight:
            self._in_flight.add(key)
        row = (probe, run_id, json.dumps(entry.variables, sort_keys=True), entry.created, entry.owner)
        await self._write(
            "INSERT INTO objects (probe, run_id, variables, created, owner) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (probe, run_id) DO UPDATE SET variables = excluded.variables", row,
        )

    async def settle(self, probe: str, run_id: str, removed: bool) -> None:
        """The run is over; `removed`: what it created is gone, so the entry goes too."""
        self._in_flight.discard((probe, run_id))
        if removed:
            await self.drop(probe, run_id)

    async def drop(self, probe: str, run_id: str) -> None:
        self._entries.pop((probe, run_id), None)
        self._in_flight.discard((probe, run_id))
        await self._write("DELETE FROM objects WHERE probe = ? AND run_id = ?", (probe, run_id))

    async def _write(self, statement: str, parameters: tuple[object, ...]) -> None:
        if self._closed:  # a run abandoned at a stop that settles after the ledger closed: the file has what it had
            log.debug("ledger closed; not written: %s %s", statement.split()[0], parameters[:2])
            return
        # Shielded: a run cancelled while its entry is written still leaves the write queued, in order, before the
        # settle its cleanup sends next.
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._execute, statement, parameters)
        await asyncio.shield(future)

    def _execute(self, statement: str, parameters: tuple[object, ...]) -> None:
        try:  # autocommit: one transaction, committed (and, with synchronous=FULL, synced) before this returns
            self._db.execute(statement, parameters)
        except sqlite3.Error as exc:
            if str(exc) != self._failing:
                log.error("cannot write the ledger %s (%s); its entries are kept in memory", self.path, exc)
            self._failing = str(exc)
            return
        if self._failing is not None:
            log.info("the ledger %s is written again", self.path)
            self._failing = None

    async def close(self) -> None:
        """Finish the writes queued, then close the file."""
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._executor, self._db.close)
        self._executor.shutdown(wait=True)

    # -- reading ---------------------------------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def in_flight(self, entry: Entry) -> bool:
        """Whether a run of this process still owns the entry (its own cleanup is still to come)."""
        return entry.key in self._in_flight

    def counts(self, names: Iterable[str] = ()) -> dict[str, int]:
        """Objects left behind per probe: every entry no run of this process still owns; 0 for each of `names`."""
        counts = dict.fromkeys(names, 0)
        for key in self._entries:
            if key not in self._in_flight:
                counts[key[0]] = counts.get(key[0], 0) + 1
        return counts


@dataclass(frozen=True)
class ProbeLedger:
    """One probe's part of the ledger (the `ObjectLedger` of canary/contract.py)."""

    ledger: Ledger
    probe: str

    async def record(self, run_id: str, variables: Mapping[str, str]) -> None:
        await self.ledger.record(self.probe, run_id, variables)

    async def settle(self, run_id: str, removed: bool) -> None:
        await self.ledger.settle(self.probe, run_id, removed)


def _open(path: Path | None) -> tuple[Path | None, sqlite3.Connection]:
    """The ledger's database: the file at `path`, or (none given, or it cannot be used) one in memory."""
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return path, _prepare(sqlite3.connect(path, timeout=5.0, check_same_thread=False, isolation_level=None))
        except (OSError, sqlite3.Error) as exc:
            log.error("cannot open the ledger %s (%s): synthetic objects are tracked in memory only, so a killed "
                      "process leaves its objects behind; set [daemon] state_dir or --state.dir to a writable "
                      "directory", path, getattr(exc, "strerror", None) or exc)
    return None, _prepare(sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None))


def _prepare(db: sqlite3.Connection) -> sqlite3.Connection:
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise sqlite3.DatabaseError(f"written by another version (schema {version}, this daemon reads {SCHEMA_VERSION})")
        db.execute(_SCHEMA)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except sqlite3.Error:
        db.close()
        raise
    return db


def building_with(ledger: Ledger, build_probe: Callable[[ProbeSettings], Probe]) -> Callable[[ProbeSettings], Probe]:
    """The probe factory `build_probe`, giving each probe whose runs create objects its part of `ledger`."""

    def build(settings: ProbeSettings) -> Probe:
        probe = build_probe(settings)
        if settings.leaves_objects():
            probe.ledger = ledger.for_probe(settings.name)
        return probe

    return build

