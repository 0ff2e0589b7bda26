"""What the Kafka probe types share: connection settings (bootstrap, SASL/SSL), aiokafka client options with
timeouts bounded by the probe's timeout, closing clients without hanging, and turning aiokafka errors into
Results. Not a probe type itself: `kafka`, `kafka_lag` and `kafka_dlq` each subclass `KafkaSettings`."""

from __future__ import annotations

import asyncio
import ssl
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import Field, SecretStr, field_validator, model_validator

from canary.contract import USER_AGENT, ProbeSettings, Result, parse_host_port, spelled
from probes.transport import CaFile, client_tls_context

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient

CLOSE_TIMEOUT = 2.0
DEFAULT_TIMEOUT = 10.0
KAFKA_LIBRARIES = ("aiokafka", "aiokafka.admin")
"""What the Kafka probe types import when they run (not before: aiokafka is one of the heavy imports)."""

TopicName = spelled(r"[A-Za-z0-9._-]{1,249}", "a Kafka topic name: 1 to 249 letters, digits, '.', '_' or '-'")
"""A Kafka topic name (the characters Kafka allows, at most 249 of them)."""


class KafkaSettings(ProbeSettings):
    """Where the cluster is and how to log in; shared by every Kafka probe type."""

    bootstrap_servers: str = Field(min_length=1)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_ca_file: CaFile | None = None

    @field_validator("bootstrap_servers")
    @classmethod
    def _valid_servers(cls, servers: str) -> str:
        for server in servers.split(","):
            try:
                parse_host_port(server)
            except ValueError:
                raise ValueError(f'must be comma-separated "host:port" pairs, got {server.strip()!r}') from None
        return servers

    @model_validator(mode="after")
    def _valid_security(self) -> "KafkaSettings":
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and not (self.sasl_plain_username and self.sasl_plain_password):
            raise ValueError(f"{self.security_protocol} needs sasl_plain_username and sasl_plain_password")
        if not sasl and (self.sasl_plain_username or self.sasl_plain_password):
            raise ValueError("sasl_plain_username/password are only used with SASL_PLAINTEXT or SASL_SSL")
        if self.ssl_ca_file and not self.security_protocol.endswith("SSL"):
            raise ValueError("ssl_ca_file is only used with SSL or SASL_SSL")
        return self

    def servers(self) -> list[str]:
        return [server.strip() for server in self.bootstrap_servers.split(",")]

    def target(self) -> str:
        return f"kafka {self.servers()[0]}"

    def client_options(self) -> dict[str, Any]:
        """aiokafka options shared by producers and consumers: every request bounded well inside the probe timeout."""
        timeout = self.timeout or DEFAULT_TIMEOUT
        request_ms = max(500, round(timeout * 1000 / 2))
        options: dict[str, Any] = {
            "bootstrap_servers": self.servers(),
            "client_id": USER_AGENT,
            "request_timeout_ms": request_ms,
            "retry_backoff_ms": 100,
            "metadata_max_age_ms": 60_000,
            "connections_max_idle_ms": max(request_ms * 2, 10_000),
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol.endswith("SSL"):
            options["ssl_context"] = client_tls_context(True, self.ssl_ca_file)
        if self.security_protocol.startswith("SASL_"):
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_plain_username
            options["sasl_plain_password"] = self.sasl_plain_password.get_secret_value()  # type: ignore[union-attr]
        return options


class _Stoppable(Protocol):
    async def stop(self) -> None: ...


async def stop_quietly(client: _Stoppable) -> None:
    """Stop an aiokafka client within CLOSE_TIMEOUT; one that will not stop politely is abandoned, not awaited forever."""
    try:
        await asyncio.wait_for(asyncio.shield(client.stop()), CLOSE_TIMEOUT)
    except Exception:  # noqa: BLE001 - closing is best effort; the run's result is already decided
        pass


async def start_consumer(
    stack: AsyncExitStack, settings: KafkaSettings, group_id: str | None, **options: Any
) -> AIOKafkaConsumer:
    """A consumer that never subscribes (so never joins a group), registered to be stopped when `stack` closes.
    `options` are further aiokafka consumer options (fetch sizes, offset reset)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(group_id=group_id, enable_auto_commit=False, **settings.client_options(), **options)
    stack.push_async_callback(stop_quietly, consumer)
    await consumer.start()
    return consumer


async def start_admin(stack: AsyncExitStack, settings: KafkaSettings) -> AIOKafkaAdminClient:
    """An admin client with the probe's connection settings and timeouts, registered to be closed when `stack`
    closes (within CLOSE_TIMEOUT, like the other clients)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**settings.client_options())

    async def close() -> None:
        try:
            await asyncio.wait_for(asyncio.shield(admin.close()), CLOSE_TIMEOUT)
        except Exception:  # noqa: BLE001 - closing is best effort; the run's result is already decided
            pass

    stack.push_async_callback(close)
    await admin.start()
    return admin


def kafka_error_result(exc: BaseException, during: str) -> Result:
    """An aiokafka (or socket/TLS) error as a failed Result; `during` names what the probe was doing."""
    from aiokafka import errors as kafka_errors

    connect_errors = (
        kafka_errors.KafkaConnectionError,
        kafka_errors.NodeNotReadyError,
        kafka_errors.NoBrokersAvailable,
        kafka_errors.KafkaUnavailableError,
        kafka_errors.BrokerNotAvailableError,
        kafka_errors.RequestTimedOutError,
        ConnectionError,
    )
    auth_errors = (
        kafka_errors.AuthenticationFailedError,
        kafka_errors.AuthenticationMethodNotSupported,
        kafka_errors.UnsupportedSaslMechanismError,
        kafka_errors.IllegalSaslStateError,
        kafka_errors.TopicAuthorizationFailedError,
        kafka_errors.GroupAuthorizationFailedError,
        kafka_errors.ClusterAuthorizationFailedError,
    )
    name, text = type(exc).__name__, str(exc)
    detail = text if text.startswith(name) else f"{name}: {text}" if text else name
    if isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError):
        return Result.fail("tls", f"TLS with the broker failed during {during}: {detail}")
    if isinstance(exc, auth_errors):
        return Result.fail("auth", f"the broker refused the credentials or ACLs during {during}: {detail}")
    if isinstance(exc, kafka_errors.KafkaTimeoutError):
        return Result.fail("timeout", f"the broker did not answer in time during {during}: {detail}")
    if text.removeprefix(f"{name}: ").startswith("Unable to bootstrap"):
        # aiokafka logs each server's own error (refused, SASL, TLS) and raises this with a list of socket tuples.
        detail = "no bootstrap server answered (refused, unreachable, or TLS/SASL refused; see the aiokafka log)"
    if isinstance(exc, (*connect_errors, OSError)):
        return Result.fail("connect", f"broker unreachable during {during}: {detail}")
    return Result.fail("status", f"the broker answered with an error during {during}: {detail}")


def __getattr__(name: str) -> Any:
    """`KAFKA_ERRORS`: what an aiokafka call may raise for an expected failure (everything else is a bug for the
    runner to report). Built on first use, which is at run time (the probe modules import it inside `run`), so
    validating a config never imports aiokafka."""
    if name == "KAFKA_ERRORS":
        from aiokafka import errors as kafka_errors

        globals()[name] = errors = (kafka_errors.KafkaError, OSError)
        return errors
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
