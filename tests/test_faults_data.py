"""Data-plane faults with real hostile servers, each run by the real scheduler beside a neighbouring probe.

A throwaway PostgreSQL cluster killed with SIGKILL in the middle of a run and started again; a query held by an
ACCESS EXCLUSIVE lock in the local PostgreSQL; a Redis of our own refusing a wrong password; a Kafka broker that
stays down (refusing, or accepting and never answering) for ten runs in a row.

Every case asserts the same three things: the faulty probe fails within its timeout with a specific reason from the
closed vocabulary, the scheduler keeps running it (and recovers it when the fault goes), and a neighbouring probe
keeps starting on time. Timings are bounds with generous margins (CI is a loaded 2-core machine), never exact.

Servers this file starts are stopped by their own pid; the system PostgreSQL and Redis are only connected to.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Literal

import asyncpg
import pytest

from canary.contract import PhaseTimer, Probe, ProbeSettings, Result
from canary.runner import run_once
from canary.scheduler import Scheduler
from canary.scrub import Scrubber
from canary.state import ResultStore
from probes import PROBE_TYPES, build_probe
from tests.conftest import Process, free_port, wait_for_port

# A probe may overrun its timeout by this much before we call it a hang: the runner's cancellation, closing
# clients and a loaded CI machine all take their share.
TIMEOUT_MARGIN = 2.0
NEIGHBOUR_INTERVAL = 0.5
# "On time": the neighbour may start late by less than one interval, whatever the faulty probe does. A stall caused by a
# hostile target lasts as long as its timeout (seconds); a loaded 2-core CI machine alone can delay a start by ~0.3 s.
FAIR_LATENESS = 1.0
CONNECTION_LOST = {"connect", "timeout"}


# --- the neighbour and the scheduler harness -----------------------------------------------------------------------


class NeighbourSettings(ProbeSettings):
    type: Literal["neighbour"] = "neighbour"


class NeighbourProbe(Probe[NeighbourSettings]):
    """Passes at once: any lateness it sees is the scheduler's (or the event loop's), not its own."""

    settings_model = NeighbourSettings

    async def run(self, timer: PhaseTimer) -> Result:
        return Result.ok("on time")


def _build(settings: ProbeSettings) -> Probe:
    return NeighbourProbe(settings) if settings.type == "neighbour" else build_probe(settings)


def settings_of(kind: str, **fields: Any) -> ProbeSettings:
    """Settings as the config loader would give them: type-checked, with interval and timeout set."""
    return PROBE_TYPES[kind].settings_model.model_validate({"type": kind, "channel": "faults", **fields})


@dataclass(frozen=True)
class Run:
    name: str
    at: float  # time.monotonic() when the result was recorded
    lateness: float
    result: Result


class Observer:
    def observe_lateness(self, seconds: float) -> None:
        pass

    def count_skipped(self, name: str, slots: int, reason: str) -> None:
        pass

    def count_starved(self, name: str) -> None:
        pass


class Scheduled:
    """The real scheduler running the given probes plus `neighbour` (every 0.5 s); keeps every recorded run."""

    def __init__(self) -> None:
        self.log: list[Run] = []
        self.scheduler: Scheduler | None = None
        self.started = 0.0

    async def start(self, *probes: ProbeSettings) -> "Scheduled":
        neighbour = NeighbourSettings(name="neighbour", channel="faults", interval=f"{NEIGHBOUR_INTERVAL * 1000:.0f}ms",
                                      timeout=f"{NEIGHBOUR_INTERVAL * 1000:.0f}ms")
        every = (*probes, neighbour)
        store = ResultStore((0.1, 1.0), history=100)
        store.sync(every, (0.1, 1.0), 100)
        store.add_listener(
            lambda record: self.log.append(Run(record.settings.name, time.monotonic(), record.last_lateness, record.latest))
        )
        self.scheduler = Scheduler(store, _build, Observer())
        self.started = time.monotonic()
        await self.scheduler.apply(every, 0.05, Scrubber([s for p in every for s in p.secret_values()]))
        return self

    async def stop(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop(grace=0.0)
            self.scheduler = None

    def runs(self, name: str, since: float = 0.0) -> list[Run]:
        return [run for run in self.log if run.name == name and run.at >= since]

    async def wait_for_runs(
        self, name: str, count: int, since: float = 0.0, timeout: float = 15.0,
        where: Callable[[Run], bool] = lambda run: True,
    ) -> list[Run]:
        """The first `count` runs of `name` recorded after `since` that satisfy `where`, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [run for run in self.runs(name, since) if where(run)]
            if len(found) >= count:
                return found[:count]
            await asyncio.sleep(0.05)
        seen = [(round(r.at - self.started, 2), r.result.reason, r.result.message) for r in self.runs(name, since)]
        raise AssertionError(f"{count} matching runs of {name} not recorded within {timeout}s; saw {seen}")

    def assert_neighbour_on_time(self, since: float) -> None:
        """Every neighbour run since `since` started within a fair fraction of its interval, and none went missing."""
        assert self.scheduler is not None and "neighbour" in self.scheduler.probe_names
        window = time.monotonic() - since
        runs = self.runs("neighbour", since)
        late = [round(run.lateness, 3) for run in runs if run.lateness >= FAIR_LATENESS * NEIGHBOUR_INTERVAL]
        assert not late, f"the neighbour started late by {late} s (interval {NEIGHBOUR_INTERVAL} s)"
        assert len(runs) >= int(window / NEIGHBOUR_INTERVAL) - 2, (len(runs), window)
        assert all(run.result.success for run in runs)


@pytest.fixture
async def scheduled() -> AsyncIterator[Scheduled]:
    harness = Scheduled()
    try:
        yield harness
    finally:
        await harness.stop()


def assert_failed_in_time(runs: list[Run], reasons: set[str], timeout: float) -> None:
    for run in runs:
        result = run.result
        assert not result.success and result.reason in reasons, (result.reason, result.message)
        assert result.duration_seconds < timeout + TIMEOUT_MARGIN, (result.duration_seconds, result.message)


# --- PostgreSQL: a throwaway cluster, killed mid-run and started again --------------------------------------------


def _postgres_bin() -> Path | None:
    found = glob.glob("/usr/lib/postgresql/*/bin/postgres")
    found.sort(key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0)
    if found and os.access(Path(found[-1]).parent / "initdb", os.X_OK):
        return Path(found[-1]).parent
    return None


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (a postmaster's backends and workers), read from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry))
    return children


class Cluster:
    """A PostgreSQL cluster of our own in a temporary directory, on a free loopback port, trust auth.

    initdb refuses to run as root, so as root it runs as the `postgres` OS user (Popen's `user=`, which sets the
    user in the child before exec: the pid we get is the postmaster's own, so it can be killed by that pid).
    """

    def __init__(self, bin_dir: Path, user: str | None) -> None:
        self.bin_dir = bin_dir
        self.user = user
        self.dir = Path(tempfile.mkdtemp(prefix="canary-faults-pg-"))
        if user is not None:
            shutil.chown(self.dir, user, user)
        self.data = self.dir / "data"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log = (self.dir / "postgres.log").open("ab")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_user(self) -> dict[str, Any]:
        return {"user": self.user, "group": self.user} if self.user else {}

    def init(self) -> None:
        completed = subprocess.run(
            [str(self.bin_dir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync",
             "-E", "UTF8", "--locale=C"],
            capture_output=True, text=True, timeout=60, **self._as_user(),
        )
        assert completed.returncode == 0, f"initdb failed: {completed.stderr[-2000:]}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=20",
             "-c", "shared_buffers=16MB"],
            stdout=self._log, stderr=subprocess.STDOUT, **self._as_user(),
        )

    def kill(self) -> list[int]:
        """SIGKILL the postmaster by its pid, as a crash would; returns its children, which exit on their own."""
        assert self.process is not None and self.process.poll() is None
        children = _children(self.process.pid)
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None
        return children

    def stop(self) -> None:
        """A fast shutdown (SIGINT) by pid, SIGKILL if it does not finish; then the directory goes."""
        if self.process is not None:
            children = _children(self.process.pid)
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
            self.process = None
            _wait_gone(children, 15.0)
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        self._log.flush()
        return (self.dir / "postgres.log").read_text(errors="replace")[-3000:]


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def pg_cluster() -> Iterator[Cluster]:
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, postgres) under /usr/lib/postgresql/*/bin")
    user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root (initdb refuses root) and there is no `postgres` OS user to run it as")
        user = "postgres"
    cluster = Cluster(bin_dir, user)
    try:
        cluster.init()
        cluster.start()
        wait_for_port(cluster.port, timeout=20.0)
        yield cluster
    finally:
        cluster.stop()


async def _wait_for_query_in_flight(dsn: str, marker: str, timeout: float = 10.0) -> None:
    """Poll the cluster until another session is running a query containing `marker`: the server says the run is
    mid-query, not a sleep."""
    connection = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid()"
                " AND strpos(query, $1) > 0", marker,
            )
            if busy:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no query containing {marker!r} ran within {timeout}s")
    finally:
        connection.terminate()  # the server is about to be killed: no polite goodbye needed


async def test_postgres_killed_mid_run_fails_with_connect_then_passes_again_in_the_same_scheduler(
    pg_cluster: Cluster, scheduled: Scheduled,
) -> None:
    marker = "pg_sleep(0.6)"
    db = settings_of("postgres", name="db", interval="1s", timeout="1500ms", dsn=pg_cluster.dsn,
                     queries=[{"name": "slow", "sql": f"SELECT 1 FROM {marker}"}])
    await scheduled.start(db)
    await scheduled.wait_for_runs("db", 1, where=lambda run: run.result.success)

    # Kill the postmaster while the probe's query is running on it.
    await _wait_for_query_in_flight(pg_cluster.dsn, marker)
    children = pg_cluster.kill()
    killed = time.monotonic()
    interrupted = (await scheduled.wait_for_runs("db", 1, since=killed))[0]
    assert_failed_in_time([interrupted], CONNECTION_LOST, 1.5)

    # Down: every run fails with connect (refused), fast, while the scheduler keeps going.
    outage = await scheduled.wait_for_runs("db", 3, since=interrupted.at + 0.01)
    assert_failed_in_time(outage, CONNECTION_LOST, 1.5)
    assert [run.result.reason for run in outage] == ["connect"] * 3, [run.result.message for run in outage]

    # Back, on the same port and data directory, without touching the scheduler: the same probe passes again.
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the old backends leave on their own once they see the postmaster gone
    pg_cluster.start()
    restarted = time.monotonic()
    try:
        await scheduled.wait_for_runs("db", 1, since=restarted, timeout=20, where=lambda run: run.result.success)
    except AssertionError as error:
        raise AssertionError(f"{error}\npostgres log:\n{pg_cluster.log()}") from None
    scheduled.assert_neighbour_on_time(since=scheduled.started)


# --- PostgreSQL: a query held by a lock ----------------------------------------------------------------------------


async def test_query_held_by_a_lock_fails_with_query_and_health_counts_the_waiting_lock(
    postgres_dsn: str, scheduled: Scheduled,
) -> None:
    schema = f"canary_fault_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(postgres_dsn)
    holder = waiter = None
    waiting: asyncio.Task[Any] | None = None
    await admin.execute(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.held (id int)")
    try:
        # One session holds ACCESS EXCLUSIVE; an "application" session queues behind it, so the health check has
        # an ungranted lock to see even between the canary's own (cancelled) attempts.
        holder = await asyncpg.connect(postgres_dsn)
        lock = holder.transaction()
        await lock.start()
        await holder.execute(f"LOCK TABLE {schema}.held IN ACCESS EXCLUSIVE MODE")
        waiter = await asyncpg.connect(postgres_dsn)
        waiting = asyncio.create_task(waiter.fetchval(f"SELECT count(*) FROM {schema}.held"))
        deadline = time.monotonic() + 10
        while not await admin.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted)", waiter.get_server_pid()
        ):
            assert time.monotonic() < deadline, "the application session never queued behind the lock"
            await asyncio.sleep(0.05)

        db = settings_of("postgres", name="db", interval="1s", timeout="2s", dsn=postgres_dsn, health_checks=True,
                         max_connections_ratio=1.0, statement_timeout="300ms",
                         queries=[{"name": "held_rows", "sql": f"SELECT count(*) FROM {schema}.held"}])
        await scheduled.start(db)
        held = await scheduled.wait_for_runs("db", 2)
        assert_failed_in_time(held, {"query"}, 2.0)
        for run in held:
            assert "statement timeout" in run.result.message, run.result.message
            gauges = {gauge.name: gauge.value for gauge in run.result.gauges}
            assert gauges.get("postgres_ungranted_locks", 0) >= 1, run.result.gauges

        # The lock goes: the application's query gets through, and the same probe passes.
        released = time.monotonic()
        await lock.rollback()
        assert await asyncio.wait_for(waiting, 10) == 0
        passed = (await scheduled.wait_for_runs("db", 1, since=released, where=lambda run: run.result.success))[0]
        assert ("query_value", 0.0) in {(gauge.name, gauge.value) for gauge in passed.result.gauges}
        scheduled.assert_neighbour_on_time(since=scheduled.started)
    finally:
        await scheduled.stop()
        if waiting is not None and not waiting.done():
            waiting.cancel()
        for connection in (holder, waiter):
            if connection is not None:
                connection.terminate()
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


# --- Redis: a server of our own with a password --------------------------------------------------------------------

REDIS_PASSWORD = "faults-redis-Pa55word"
WRONG_PASSWORD = "faults-redis-wrong-guess"


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH, so no password-protected Redis can be started")
    port = free_port()
    process = Process([binary, "--bind", "127.0.0.1", "--port", str(port), "--requirepass", REDIS_PASSWORD,
                       "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(tmp_path)])
    try:
        wait_for_port(port, process)
        yield port
    finally:
        process.stop()


async def test_redis_wrong_password_fails_with_auth_while_the_right_one_passes(
    password_redis: int, scheduled: Scheduled,
) -> None:
    def cache(name: str, password: str) -> ProbeSettings:
        return settings_of("redis", name=name, interval="500ms", timeout="1s",
                           url=f"redis://:{password}@127.0.0.1:{password_redis}/0")

    await scheduled.start(cache("cache-wrong", WRONG_PASSWORD), cache("cache-right", REDIS_PASSWORD))
    refused = await scheduled.wait_for_runs("cache-wrong", 4)
    accepted = await scheduled.wait_for_runs("cache-right", 4)
    assert_failed_in_time(refused, {"auth"}, 1.0)
    assert all(run.result.success for run in accepted), [run.result.message for run in accepted]
    for run in refused:
        assert WRONG_PASSWORD not in run.result.message and REDIS_PASSWORD not in run.result.message
    scheduled.assert_neighbour_on_time(since=scheduled.started)


# --- Kafka: a broker down for ten runs in a row --------------------------------------------------------------------


class SilentServer:
    """Accepts TCP connections and never answers a byte: a broker that hangs.

    One thread for every connection (a fixed count, so it cannot pass for a leak); a connection is closed here
    when the client closes it, so a client that leaks its sockets shows as growing file descriptors.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent-broker", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(0.1):
                    if key.fileobj is self._listener:
                        try:
                            connection, _ = self._listener.accept()
                        except BlockingIOError:
                            continue
                        connection.setblocking(False)
                        selector.register(connection, selectors.EVENT_READ)
                        continue
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        selector.unregister(sock)
                        sock.close()
            for key in list(selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _resources() -> dict[str, int]:
    return {
        "threads": threading.active_count(),
        "tasks": len(asyncio.all_tasks()),
        "fds": len(os.listdir("/proc/self/fd")),
    }


KAFKA_TIMEOUT = 1.0
SLACK = 2


@pytest.mark.parametrize("broker", ["refused", "silent"])
async def test_kafka_down_for_ten_runs_fails_each_run_without_growing_threads_tasks_or_fds(
    broker: str, scheduled: Scheduled,
) -> None:
    silent = SilentServer() if broker == "silent" else None
    bootstrap = f"127.0.0.1:{silent.port if silent else free_port()}"  # a free port: nothing listens there
    common = {"interval": "10s", "timeout": f"{KAFKA_TIMEOUT * 1000:.0f}ms", "bootstrap_servers": bootstrap}
    probes = [
        build_probe(settings_of("kafka", name="kafka", topics=["fte.tickets.incoming"], canary_topic="fte.canary",
                                **common)),
        build_probe(settings_of("kafka_lag", name="kafka-lag",
                                groups=[{"name": "fte-workers", "topics": ["fte.tickets.incoming"]}], **common)),
        build_probe(settings_of("kafka_dlq", name="kafka-dlq", topics=["fte.tickets.dlq"], **common)),
    ]
    await scheduled.start()  # only the neighbour: the Kafka runs below share its event loop
    counts: dict[int, dict[str, int]] = {}
    try:
        for number in range(1, 11):
            for probe in probes:
                result = await run_once(probe, KAFKA_TIMEOUT, Scrubber())
                assert result.reason in CONNECTION_LOST, (probe.settings.name, number, result.reason, result.message)
                assert result.duration_seconds < KAFKA_TIMEOUT + TIMEOUT_MARGIN, (probe.settings.name, number, result)
            if number in (2, 10):
                await asyncio.sleep(1.0)  # let closed sockets and finished tasks go
                counts[number] = _resources()
        scheduled.assert_neighbour_on_time(since=scheduled.started)
    finally:
        for probe in probes:
            await probe.close()
        if silent is not None:
            silent.close()
    grown = {kind: counts[10][kind] - counts[2][kind] for kind in counts[2]}
    assert all(growth <= SLACK for growth in grown.values()), f"after run 2: {counts[2]}, after run 10: {counts[10]}"
