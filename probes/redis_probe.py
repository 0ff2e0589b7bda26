"""`redis` probe: a fresh connection and `PING` (the runbooks' Redis check), plus optional `INFO` figures.

The module is not called `redis.py`, which would shadow the redis-py library it uses.
Each run opens one new connection and closes it, so connect and AUTH are tested every time, and redis-py's
own retries are switched off: a canary reports the first failure instead of hiding it behind a retry.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, field_validator
from yarl import URL

from canary.contract import Duration, Gauge, PhaseTimer, Probe, ProbeSettings, Result

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

_SCHEMES = ("redis", "rediss")
_CLOSE_TIMEOUT = 2.0


class RedisSettings(ProbeSettings):
    type: Literal["redis"] = "redis"
    url: SecretStr
    info: bool = False
    max_memory_ratio: float | None = Field(default=None, gt=0, le=1)
    socket_timeout: Duration = 5.0

    @field_validator("url")
    @classmethod
    def _valid_url(cls, url: SecretStr) -> SecretStr:
        try:
            parsed = URL(url.get_secret_value())
        except (ValueError, TypeError):
            raise ValueError("must be a redis:// or rediss:// URL") from None
        if parsed.scheme not in _SCHEMES or not parsed.host:
            raise ValueError("must be a redis:// or rediss:// URL with a host")
        return url

    def target(self) -> str:
        url = URL(self.url.get_secret_value())
        return f"{url.scheme} {url.host}:{url.port or 6379}{url.path if url.path != '/' else ''}"

    def secret_values(self) -> list[str]:
        secrets = super().secret_values()
        password = URL(self.url.get_secret_value()).password
        return secrets + ([password] if password else [])


class RedisProbe(Probe[RedisSettings]):
    settings_model = RedisSettings
    reasons = ("connect", "auth", "timeout", "query", "threshold")
    libraries = ("redis.asyncio",)

    async def run(self, timer: PhaseTimer) -> Result:
        import redis.asyncio as aioredis
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError
        from redis.retry import Retry

        settings = self.settings
        client = aioredis.Redis.from_url(
            settings.url.get_secret_value(),
            single_connection_client=True,
            socket_connect_timeout=settings.socket_timeout,
            socket_timeout=settings.socket_timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        try:
            with timer.phase("connect"):
                await client.initialize()  # opens the connection, with AUTH and SELECT
            with timer.phase("ping"):
                await client.ping()
            if not settings.info:
                return Result.ok("PING answered PONG")
            with timer.phase("info"):
                info = await client.info()
            return self._judge_info(info)
        except RedisError as exc:
            return _error_result(exc, timer.current or "connect")
        finally:
            await _close(client)

    def _judge_info(self, info: dict[str, Any]) -> Result:
        used = float(info.get("used_memory", 0))
        maximum = float(info.get("maxmemory", 0))
        gauges = (
            Gauge("redis_connected_clients", float(info.get("connected_clients", 0)), "Clients connected to Redis."),
            Gauge("redis_used_memory_bytes", used, "Memory Redis has allocated (INFO used_memory)."),
            Gauge("redis_maxmemory_bytes", maximum, "Redis's maxmemory setting; 0 means no limit."),
            Gauge("redis_rejected_connections", float(info.get("rejected_connections", 0)),
                  "Connections Redis refused (maxclients) since it started.", kind="counter"),
        )
        limit = self.settings.max_memory_ratio
        if limit is not None and maximum > 0 and used / maximum > limit:
            return Result.fail(
                "threshold",
                f"Redis uses {used / maximum:.0%} of maxmemory ({used:.0f} of {maximum:.0f} bytes), "
                f"above max_memory_ratio {limit:g}",
                gauges=gauges,
            )
        note = "" if maximum > 0 else ", no maxmemory set"
        return Result.ok(f"PING answered PONG; {used:.0f} bytes used{note}", gauges=gauges)


def _error_result(exc: RedisError, phase: str) -> Result:
    from redis.exceptions import AuthenticationError, ResponseError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    detail = str(exc) or type(exc).__name__
    if isinstance(exc, AuthenticationError):
        return Result.fail("auth", f"Redis refused the credentials: {detail}")
    if isinstance(exc, RedisTimeoutError):
        return Result.fail("timeout", f"Redis did not answer during {phase}: {detail}")
    if isinstance(exc, RedisConnectionError):
        if phase == "connect":
            return Result.fail("connect", f"cannot connect to Redis: {detail}")
        return Result.fail("connect", f"connection to Redis lost during {phase}: {detail}")
    if isinstance(exc, ResponseError):
        return Result.fail("query", f"Redis answered {phase} with an error: {detail}")
    return Result.fail("connect", f"Redis failed during {phase}: {type(exc).__name__}: {detail}")


async def _close(client: aioredis.Redis) -> None:
    """Closes the client even when the run was cancelled; a connection that will not close politely is dropped."""
    try:
        await asyncio.shield(asyncio.wait_for(client.aclose(), _CLOSE_TIMEOUT))
    except Exception:  # noqa: BLE001 - closing is best effort; the socket is gone with the client
        pass
