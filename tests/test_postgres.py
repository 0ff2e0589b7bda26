"""The postgres probe against the real local PostgreSQL: SELECT 1, health figures made real (a long query, a
waiting lock), user queries and their limits, the read-only guard, and failures to log in or connect.

Every object a test creates lives in its own `canary_test_<random>` schema, dropped afterwards; every connection
a test opens is closed in a `finally`.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import time
import warnings
from typing import Any, AsyncIterator

import asyncpg
import pytest
from yarl import URL

from canary.contract import PhaseTimer, Result
from canary.runner import run_once
from canary.scrub import Scrubber
from probes.postgres import PostgresProbe, PostgresSettings
from tests.conftest import free_port

RUN_TIMEOUT = 3.0


def make_probe(dsn: str, **extra: Any) -> PostgresProbe:
    settings = PostgresSettings.model_validate(
        {"name": "db", "type": "postgres", "channel": "database", "interval": "10s", "timeout": "3s", "dsn": dsn, **extra}
    )
    return PostgresProbe(settings)


async def run(probe: PostgresProbe) -> Result:
    return await run_once(probe, RUN_TIMEOUT, Scrubber(probe.settings.secret_values()))


def gauge_values(result: Result) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(gauge.name, gauge.labels): gauge.value for gauge in result.gauges}


def health(result: Result) -> dict[str, float]:
    return {gauge.name: gauge.value for gauge in result.gauges if gauge.name.startswith("postgres_")}


async def wait_for(connection: asyncpg.Connection, sql: str, *args: Any, timeout: float = 10.0) -> None:
    """Poll until `sql` returns true: the server, not a sleep, says the situation is in place."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await connection.fetchval(sql, *args):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not true within {timeout}s: {sql}")


@pytest.fixture
async def admin(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(postgres_dsn)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def schema(admin: asyncpg.Connection) -> AsyncIterator[str]:
    """A schema only this test uses, with one table `items`; dropped with everything in it afterwards."""
    name = f"canary_test_{secrets.token_hex(6)}"
    await admin.execute(f"CREATE SCHEMA {name}")
    try:
        await admin.execute(f"CREATE TABLE {name}.items (id int)")
        yield name
    finally:
        await admin.execute(f"DROP SCHEMA {name} CASCADE")


async def relation_exists(connection: asyncpg.Connection, name: str) -> bool:
    return await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", name)


# --- the runbooks' first check -------------------------------------------------------------------------------


async def test_select_1_passes_with_connect_and_query_phases(postgres_dsn: str) -> None:
    result = await run(make_probe(postgres_dsn))
    assert (result.success, result.reason, result.message) == (True, "ok", "SELECT 1 ok")
    assert set(result.phases) == {"connect", "query"}
    assert all(seconds > 0 for seconds in result.phases.values())
    assert result.gauges == ()
    assert 0 < result.duration_seconds < RUN_TIMEOUT


async def test_probe_closes_its_connection(postgres_dsn: str, admin: asyncpg.Connection) -> None:
    app = f"canary_test_{secrets.token_hex(6)}"
    dsn = str(URL(postgres_dsn).with_query(application_name=app))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        passing = await run(make_probe(dsn))
        failing = await run(make_probe(dsn, queries=[{"name": "broken", "sql": "SELEC 1"}]))
        gc.collect()
    assert (passing.reason, failing.reason) == ("ok", "query")
    # asyncpg warns when it has to drop a connection nobody closed; the probe closes its own.
    assert [str(w.message) for w in caught if "unclosed connection" in str(w.message)] == []
    await wait_for(admin, "SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = $1", app)


# --- health figures -------------------------------------------------------------------------------------------


async def test_health_checks_export_plausible_gauges(postgres_dsn: str, admin: asyncpg.Connection) -> None:
    result = await run(make_probe(postgres_dsn, health_checks=True))
    assert result.reason == "ok", result.message
    assert "health" in result.phases
    figures = health(result)
    assert set(figures) == {
        "postgres_connections",
        "postgres_max_connections",
        "postgres_long_running_queries",
        "postgres_ungranted_locks",
    }
    # The probe's own connection and this test's admin connection are both open.
    assert figures["postgres_connections"] >= 2
    assert figures["postgres_max_connections"] == int(await admin.fetchval("SHOW max_connections"))
    assert figures["postgres_connections"] <= figures["postgres_max_connections"]
    assert figures["postgres_long_running_queries"] >= 0
    assert figures["postgres_ungranted_locks"] >= 0


async def test_connections_over_the_ratio_fail_on_threshold(postgres_dsn: str) -> None:
    result = await run(make_probe(postgres_dsn, health_checks=True, max_connections_ratio=0.001))
    assert result.reason == "threshold"
    figures = health(result)
    used, limit = int(figures["postgres_connections"]), int(figures["postgres_max_connections"])
    assert result.message == f"{used} of {limit} connections in use"


async def test_long_running_query_crosses_threshold(postgres_dsn: str, admin: asyncpg.Connection) -> None:
    sleeper = await asyncpg.connect(postgres_dsn)
    sleeping = asyncio.create_task(sleeper.fetchval("SELECT pg_sleep(3)"))
    try:
        pid = sleeper.get_server_pid()
        await wait_for(
            admin,
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'"
            " AND clock_timestamp() - query_start > interval '1.2 seconds')",
            pid,
        )
        result = await run(make_probe(postgres_dsn, health_checks=True, long_query_threshold="1s", max_long_queries=0))
        assert result.reason == "threshold", result.message
        figures = health(result)
        assert figures["postgres_long_running_queries"] >= 1
        assert result.message == f"{int(figures['postgres_long_running_queries'])} queries running over 1s"
    finally:
        await admin.execute("SELECT pg_cancel_backend($1)", sleeper.get_server_pid())
        try:
            await sleeping
        except asyncpg.QueryCanceledError:
            pass
        await sleeper.close()


async def test_ungranted_lock_is_counted(postgres_dsn: str, admin: asyncpg.Connection, schema: str) -> None:
    holder = await asyncpg.connect(postgres_dsn)
    waiter = await asyncpg.connect(postgres_dsn)
    holding = holder.transaction()
    waiting: asyncio.Task[Any] | None = None
    try:
        await holding.start()
        await holder.execute(f"LOCK TABLE {schema}.items IN ACCESS EXCLUSIVE MODE")
        waiting = asyncio.create_task(waiter.fetchval(f"SELECT count(*) FROM {schema}.items"))
        await wait_for(admin, "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted)", waiter.get_server_pid())

        counted = await run(make_probe(postgres_dsn, health_checks=True))
        assert counted.reason == "ok", counted.message
        assert health(counted)["postgres_ungranted_locks"] >= 1

        limited = await run(make_probe(postgres_dsn, health_checks=True, max_ungranted_locks=0))
        assert limited.reason == "threshold"
        locks = int(health(limited)["postgres_ungranted_locks"])
        assert locks >= 1
        assert limited.message == f"{locks} ungranted locks"
    finally:
        await holding.rollback()
        if waiting is not None:
            assert await asyncio.wait_for(waiting, 10) == 0  # the lock released, the waiter got through
        await waiter.close()
        await holder.close()


# --- user queries ---------------------------------------------------------------------------------------------


async def test_query_values_become_gauges(postgres_dsn: str) -> None:
    queries = [
        {"name": "open_tickets", "sql": "SELECT 42"},
        {"name": "escalation_rate", "sql": "SELECT 0.25::numeric"},
        {"name": "agents_online", "sql": "SELECT count(*) FROM generate_series(1, 7)"},
    ]
    result = await run(make_probe(postgres_dsn, queries=queries))
    assert result.reason == "ok", result.message
    assert "queries" in result.phases
    assert gauge_values(result) == {
        ("query_value", (("query", "open_tickets"),)): 42.0,
        ("query_value", (("query", "escalation_rate"),)): 0.25,
        ("query_value", (("query", "agents_online"),)): 7.0,
    }


@pytest.mark.parametrize(
    ("limits", "reason", "message"),
    [
        ({"max": 10}, "threshold", "open_tickets = 42 is above 10"),
        ({"min": 100}, "threshold", "open_tickets = 42 is below 100"),
        ({"min": 100, "max": 10}, "threshold", "open_tickets = 42 is above 10; open_tickets = 42 is below 100"),
        ({"min": 42, "max": 42}, "ok", "SELECT 1 ok"),  # limits are inclusive
    ],
)
async def test_query_limits(postgres_dsn: str, limits: dict[str, float], reason: str, message: str) -> None:
    result = await run(make_probe(postgres_dsn, queries=[{"name": "open_tickets", "sql": "SELECT 42", **limits}]))
    assert (result.reason, result.message) == (reason, message)
    # The value is exported even when it crosses a limit.
    assert gauge_values(result) == {("query_value", (("query", "open_tickets"),)): 42.0}


async def test_query_error_fails_with_query(postgres_dsn: str) -> None:
    result = await run(make_probe(postgres_dsn, queries=[{"name": "broken", "sql": "SELEC 42"}]))
    assert result.reason == "query"
    assert result.message == 'query broken failed: syntax error at or near "SELEC"'
    assert result.gauges == ()


@pytest.mark.parametrize(
    ("sql", "type_name"), [("SELECT 'many'", "str"), ("SELECT NULL", "NoneType"), ("SELECT now()", "datetime")]
)
async def test_non_numeric_result_fails_with_query(postgres_dsn: str, sql: str, type_name: str) -> None:
    result = await run(make_probe(postgres_dsn, queries=[{"name": "backlog", "sql": sql}]))
    assert result.reason == "query"
    assert result.message == f"query backlog returned {type_name}, not a number"


async def test_create_table_is_refused_read_only(postgres_dsn: str, admin: asyncpg.Connection, schema: str) -> None:
    table = f"{schema}.written_by_canary"
    result = await run(make_probe(postgres_dsn, queries=[{"name": "write", "sql": f"CREATE TABLE {table} (id int)"}]))
    assert result.reason == "query"
    assert result.message == "query write failed: cannot execute CREATE TABLE in a read-only transaction"
    assert not await relation_exists(admin, table)


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("INSERT INTO {schema}.items VALUES (1)", "cannot execute INSERT in a read-only transaction"),
        (
            "WITH written AS (INSERT INTO {schema}.items VALUES (1) RETURNING 1) SELECT count(*) FROM written",
            "cannot execute SELECT in a read-only transaction",
        ),
        (
            "SELECT 1 FROM (SELECT set_config('transaction_read_only', 'off', true)) AS flipped",
            "transaction read-write mode must be set before any query",
        ),
    ],
    ids=["insert", "insert-in-cte-returning-a-number", "switch-to-read-write"],
)
async def test_writes_are_refused_read_only(
    postgres_dsn: str, admin: asyncpg.Connection, schema: str, sql: str, message: str
) -> None:
    result = await run(make_probe(postgres_dsn, queries=[{"name": "write", "sql": sql.format(schema=schema)}]))
    assert result.reason == "query"
    assert result.message == f"query write failed: {message}"
    assert await admin.fetchval(f"SELECT count(*) FROM {schema}.items") == 0


async def test_read_write_switch_cannot_let_a_later_query_write(
    postgres_dsn: str, admin: asyncpg.Connection, schema: str
) -> None:
    table = f"{schema}.written_by_canary"
    queries = [
        {"name": "switch", "sql": "SET TRANSACTION READ WRITE"},
        {"name": "write", "sql": f"CREATE TABLE {table} AS SELECT 1 AS one"},
    ]
    result = await run(make_probe(postgres_dsn, queries=queries))
    assert result.reason == "query"
    assert not await relation_exists(admin, table)


async def test_statement_timeout_cuts_a_slow_query(postgres_dsn: str) -> None:
    probe = make_probe(postgres_dsn, statement_timeout="200ms", queries=[{"name": "slow", "sql": "SELECT pg_sleep(30)"}])
    result = await run(probe)
    # The server's 200ms statement timeout cut it (reason query), not the 3 s run timeout (reason timeout).
    assert result.reason == "query"
    assert result.message == "query slow failed: canceling statement due to statement timeout"


async def test_sub_millisecond_statement_timeout_still_limits(postgres_dsn: str) -> None:
    # PostgreSQL reads statement_timeout = 0 as "no limit": a tiny configured limit must not become none.
    probe = make_probe(postgres_dsn, statement_timeout="0.5ms", queries=[{"name": "slow", "sql": "SELECT 1 FROM pg_sleep(30)"}])
    result = await run(probe)
    # Cut by the server (reason query), not by the 3 s run timeout nor by the 30 s sleep running out.
    assert result.reason == "query"
    assert result.message == "query slow failed: canceling statement due to statement timeout"


async def test_statement_timeout_is_applied_in_the_right_unit(postgres_dsn: str) -> None:
    # "1s" must reach the server as 1000ms: queries well inside it, one after another, all pass.
    probe = make_probe(
        postgres_dsn,
        statement_timeout="1s",
        queries=[{"name": "first", "sql": "SELECT 1"}, {"name": "short_sleep", "sql": "SELECT 1 FROM pg_sleep(0.3)"}],
    )
    result = await run(probe)
    assert result.reason == "ok", result.message
    assert gauge_values(result)[("query_value", (("query", "short_sleep"),))] == 1.0


# --- logging in and connecting --------------------------------------------------------------------------------


async def test_unknown_role_is_an_auth_failure(postgres_dsn: str) -> None:
    dsn = str(URL(postgres_dsn).with_user("no_such_role"))
    result = await run(make_probe(dsn))
    assert result.reason == "auth"
    assert result.message == 'login refused: role "no_such_role" does not exist'
    assert "query" not in result.phases


async def test_unknown_database_is_a_connect_failure(postgres_dsn: str) -> None:
    database = f"canary_test_{secrets.token_hex(6)}"
    result = await run(make_probe(str(URL(postgres_dsn).with_path(f"/{database}"))))
    assert result.reason == "connect"
    assert result.message == f'cannot connect: database "{database}" does not exist'


async def test_closed_port_is_a_connect_failure_and_never_shows_the_password() -> None:
    port = free_port()
    dsn = f"postgresql://postgres:topsecretpw@127.0.0.1:{port}/postgres"
    probe = make_probe(dsn)
    result = await run(probe)
    assert result.reason == "connect"
    assert result.message.startswith("cannot connect: ")
    assert str(port) in result.message
    assert "topsecretpw" not in result.message
    # Not only masked on the way out: the probe's own message never held it.
    raw = await probe.run(PhaseTimer())
    assert raw.reason == "connect"
    assert "topsecretpw" not in raw.message
