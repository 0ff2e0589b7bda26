"""`tcp` probe: open a TCP (optionally TLS) connection, optionally send a line and check what comes back.

This is the runbooks' "is the port open" check for services without an HTTP health endpoint (brokers,
SMTP, custom daemons). Reading is bounded by `max_read_bytes`, so a chatty or hostile peer cannot make
the probe buffer without limit.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import Literal

from pydantic import Field

from canary.contract import Check, PhaseTimer, Probe, ProbeSettings, Regex, Result, format_duration
from probes.patterns import RegexTimeout, compile_regex, search
from probes.transport import CaFile, client_tls_context, close_writer, connect_error_result

_READ_CHUNK = 4096
_SHOWN_REPLY = 80
_DEFAULT_TIMEOUT = 10.0  # settings built outside a config file carry no timeout
_CHECK_MARGIN = 0.25  # `expect` gives up this long before the run's timeout, so its own failure is reported


class TcpSettings(ProbeSettings):
    type: Literal["tcp"] = "tcp"
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(ge=1, le=65535)
    send: str | None = None
    expect: Regex | None = None
    max_read_bytes: int = Field(default=4096, gt=0, le=1_048_576)
    tls: bool = False
    verify_tls: bool = True
    ca_file: CaFile | None = None
    server_name: str | None = None

    def target(self) -> str:
        return f"{'tls' if self.tls else 'tcp'} {self.host}:{self.port}"


class TcpProbe(Probe[TcpSettings]):
    settings_model = TcpSettings
    reasons = ("dns", "connect", "tls", "assertion")

    def __init__(self, settings: TcpSettings) -> None:
        super().__init__(settings)
        self._expect = compile_regex(settings.expect.encode()) if settings.expect is not None else None
        self._ssl = client_tls_context(settings.verify_tls, settings.ca_file) if settings.tls else None

    async def run(self, timer: PhaseTimer) -> Result:
        settings = self.settings
        deadline = perf_counter() + (settings.timeout or _DEFAULT_TIMEOUT)
        timer.begin("connect")
        try:
            reader, writer = await asyncio.open_connection(
                settings.host, settings.port, ssl=self._ssl,
                server_hostname=(settings.server_name or settings.host) if self._ssl else None,
            )
        except OSError as exc:
            return connect_error_result(exc, settings.host, settings.port)
        timer.end("connect")
        try:
            if settings.send is None and self._expect is None:
                return Result.ok(f"connected to {settings.host}:{settings.port}")
            with timer.phase("exchange"):
                return await self._exchange(reader, writer, deadline)
        except OSError as exc:
            return Result.fail("connect", f"connection to {settings.host}:{settings.port} lost: {exc.strerror or exc}")
        finally:
            await close_writer(writer)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, deadline: float) -> Result:
        settings = self.settings
        if settings.send is not None:
            writer.write(settings.send.encode())
            await writer.drain()
        if self._expect is None:
            return Result.ok(f"sent {len(settings.send or '')} bytes to {settings.host}:{settings.port}")
        try:
            reply, matched = await self._read_until_match(reader, deadline)
        except _GaveUp as exc:
            reply, matched = exc.reply, False
            why = (f"the search gave up after {format_duration(exc.seconds)}: the pattern backtracks too much on "
                   f"these {len(reply)} bytes")
        else:
            why = "the reply grew past max_read_bytes" if len(reply) >= settings.max_read_bytes else "the peer closed the connection"
        shown = reply[:_SHOWN_REPLY].decode("utf-8", "replace")
        if matched:
            return Result.ok(f"reply matched /{settings.expect}/", checks=(Check(True, f"[REPLY] matches /{settings.expect}/"),))
        return Result.fail(
            "assertion",
            f"reply does not match /{settings.expect}/ ({why}); got {len(reply)} bytes: {shown!r}",
            checks=(Check(False, f"[REPLY] matches /{settings.expect}/"),),
        )

    async def _read_until_match(self, reader: asyncio.StreamReader, deadline: float) -> tuple[bytes, bool]:
        """Reads until the pattern matches, the peer closes, or `max_read_bytes` arrived; the runner bounds the time.
        Each search runs off the loop when it takes long, and gives up (_GaveUp) before the run's timeout."""
        assert self._expect is not None
        limit = self.settings.max_read_bytes
        reply = b""
        while len(reply) < limit:
            chunk = await reader.read(min(_READ_CHUNK, limit - len(reply)))
            if not chunk:
                break
            reply += chunk
            try:
                if await search(self._expect, reply, deadline - perf_counter() - _CHECK_MARGIN) is not None:
                    return reply, True
            except RegexTimeout as exc:
                raise _GaveUp(reply, exc.seconds) from None
        return reply, False


class _GaveUp(Exception):
    def __init__(self, reply: bytes, seconds: float) -> None:
        super().__init__(reply, seconds)
        self.reply = reply
        self.seconds = seconds
