"""`postgres` probe: a fresh connection and `SELECT 1` (the runbooks' first check), plus optional health figures
and user-defined read-only queries exported as gauges (ticket backlog, escalation rate, ...)."""

from __future__ import annotations

import asyncio
import math
import ssl
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from yarl import URL

from canary.contract import Duration, Gauge, PhaseTimer, Probe, ProbeSettings, Result, spelled

if TYPE_CHECKING:
    import asyncpg


_HEALTH_SQL = """
SELECT
  (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend') AS connections,
  current_setting('max_connections')::int AS max_connections,
  (SELECT count(*) FROM pg_stat_activity
     WHERE state = 'active' AND pid <> pg_backend_pid() AND now() - query_start > $1) AS long_queries,
  (SELECT count(*) FROM pg_locks WHERE NOT granted) AS ungranted_locks
"""
_CLOSE_TIMEOUT = 2.0


QueryName = spelled(r"[a-z][a-z0-9_]{0,63}", "1 to 64 lower-case letters, digits or '_', starting with a letter")


class PostgresQuery(BaseModel):
    """A read-only query whose single value becomes `canary_probe_query_value{query="<name>"}`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: QueryName
    sql: str = Field(min_length=1)
    help: str = ""
    max: float | None = None
    min: float | None = None


class PostgresSettings(ProbeSettings):
    type: Literal["postgres"] = "postgres"
    dsn: SecretStr
    health_checks: bool = False
    long_query_threshold: Duration = 5.0
    max_connections_ratio: float | None = Field(default=0.9, gt=0, le=1)
    max_long_queries: int | None = Field(default=None, ge=0)
    max_ungranted_locks: int | None = Field(default=None, ge=0)
    queries: list[PostgresQuery] = Field(default_factory=list)
    statement_timeout: Duration = 5.0

    @field_validator("dsn")
    @classmethod
    def _valid_dsn(cls, dsn: SecretStr) -> SecretStr:
        if not dsn.get_secret_value().startswith(("postgres://", "postgresql://")):
            raise ValueError("must be a postgresql:// URL")
        return dsn

    @model_validator(mode="after")
    def _unique_queries(self) -> "PostgresSettings":
        names = [query.name for query in self.queries]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"query names must be unique (repeated: {', '.join(duplicates)})")
        return self

    def target(self) -> str:
        url = URL(self.dsn.get_secret_value())
        return f"postgres {url.host or 'localhost'}:{url.port or 5432}{url.path}"


class PostgresProbe(Probe[PostgresSettings]):
    settings_model = PostgresSettings
    reasons = ("connect", "auth", "tls", "timeout", "query", "threshold")
    figure_labels = frozenset({"query"})
    libraries = ("asyncpg",)

    async def run(self, timer: PhaseTimer) -> Result:
        import asyncpg

        settings = self.settings
        timer.begin("connect")
        try:
            connection = await asyncpg.connect(
                settings.dsn.get_secret_value(), timeout=settings.timeout, statement_cache_size=0
            )
        except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
            return Result.fail("auth", f"login refused: {exc}")
        except ssl.SSLError as exc:
            return Result.fail("tls", f"TLS with the server failed: {exc}")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return Result.fail("connect", f"cannot connect: {exc or type(exc).__name__}")
        timer.end("connect")
        try:
            return await self._checks(connection, timer)
        except asyncpg.PostgresError as exc:
            return Result.fail("query", f"{timer.current or 'query'} failed: {exc}")
        except (OSError, asyncpg.InterfaceError) as exc:
            return Result.fail("connect", f"connection lost during {timer.current or 'query'}: {exc}")
        finally:
            await _close(connection)

    async def _checks(self, connection: asyncpg.Connection, timer: PhaseTimer) -> Result:
        settings = self.settings
        with timer.phase("query"):
            if await connection.fetchval("SELECT 1") != 1:
                return Result.fail("query", "SELECT 1 did not return 1")
        gauges: list[Gauge] = []
        problems: list[str] = []
        if settings.health_checks:
            with timer.phase("health"):
                row = await connection.fetchrow(_HEALTH_SQL, timedelta(seconds=settings.long_query_threshold))
            gauges += [
                Gauge("postgres_connections", row["connections"], "Client connections open on the server."),
                Gauge("postgres_max_connections", row["max_connections"], "The server's max_connections setting."),
                Gauge("postgres_long_running_queries", row["long_queries"],
                      "Queries running longer than the probe's long_query_threshold."),
                Gauge("postgres_ungranted_locks", row["ungranted_locks"], "Lock requests waiting to be granted."),
            ]
            ratio = row["connections"] / max(row["max_connections"], 1)
            if settings.max_connections_ratio is not None and ratio > settings.max_connections_ratio:
                problems.append(f"{row['connections']} of {row['max_connections']} connections in use")
            if settings.max_long_queries is not None and row["long_queries"] > settings.max_long_queries:
                problems.append(f"{row['long_queries']} queries running over {settings.long_query_threshold:g}s")
            if settings.max_ungranted_locks is not None and row["ungranted_locks"] > settings.max_ungranted_locks:
                problems.append(f"{row['ungranted_locks']} ungranted locks")
        if settings.queries:
            with timer.phase("queries"):
                values = await self._run_queries(connection)
            if isinstance(values, Result):
                # Keep the health figures: a query held by a lock is just when the ungranted-lock count matters.
                return replace(values, gauges=(*gauges, *values.gauges))
            for query, value in zip(settings.queries, values):
                gauges.append(Gauge("query_value", value, "Value of a configured read-only query.", (("query", query.name),)))
                if query.max is not None and value > query.max:
                    problems.append(f"{query.name} = {value:g} is above {query.max:g}")
                if query.min is not None and value < query.min:
                    problems.append(f"{query.name} = {value:g} is below {query.min:g}")
        if problems:
            return Result.fail("threshold", "; ".join(problems), gauges=tuple(gauges))
        return Result.ok("SELECT 1 ok", gauges=tuple(gauges))

    async def _run_queries(self, connection: asyncpg.Connection) -> list[float] | Result:
        """Every user query runs in one READ ONLY transaction under a statement timeout: a canary never writes."""
        import asyncpg

        values: list[float] = []
        timeout_ms = max(1, round(self.settings.statement_timeout * 1000))  # 0 would mean "no limit"
        async with connection.transaction(readonly=True):
            await connection.execute(f"SET LOCAL statement_timeout = {timeout_ms}")
            for query in self.settings.queries:
                try:
                    raw = await connection.fetchval(query.sql)
                except asyncpg.PostgresError as exc:
                    return Result.fail("query", f"query {query.name} failed: {exc}")
                value = _number(raw)
                if value is None:
                    return Result.fail("query", f"query {query.name} returned {type(raw).__name__}, not a number")
                values.append(value)
        return values


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float, Decimal)):
        number = float(value)
        return None if math.isnan(number) else number
    return None


async def _close(connection: asyncpg.Connection) -> None:
    try:
        await asyncio.shield(connection.close(timeout=_CLOSE_TIMEOUT))
    except Exception:  # noqa: BLE001 - a connection that will not close politely is dropped
        connection.terminate()
