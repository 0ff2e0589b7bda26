"""`tcp` probe: open a TCP (optionally TLS) connection, optionally send a line and check what comes back.

This is the runbooks' "is the port open" check for services without an HTTP health endpoint (brokers,
SMTP, custom daemons). Reading is bounded by `max_read_bytes`, so a chatty or hostile peer cannot make
the probe buffer without limit.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from typing import Literal

from pydantic import Field

from canary.phases import PhaseTimer
from canary.result import Check, Result
from probes.base import Probe, ProbeSettings, Regex

_READ_CHUNK = 4096
_CLOSE_TIMEOUT = 2.0
_SHOWN_REPLY = 80


class TcpSettings(ProbeSettings):
    type: Literal["tcp"] = "tcp"
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(ge=1, le=65535)
    send: str | None = None
    expect: Regex | None = None
    max_read_bytes: int = Field(default=4096, gt=0, le=1_048_576)
    tls: bool = False
    verify_tls: bool = True
    ca_file: str | None = None
    server_name: str | None = None

    def target(self) -> str:
        return f"{'tls' if self.tls else 'tcp'} {self.host}:{self.port}"


def client_tls_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """A client context that verifies chain and host name, or, with verify off, accepts anything."""
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Closes a connection without letting a peer that never answers the TLS close hold the run."""
    writer.close()
    try:
        await asyncio.shield(asyncio.wait_for(writer.wait_closed(), _CLOSE_TIMEOUT))
    except (Exception, asyncio.CancelledError):  # noqa: BLE001 - the socket is closed either way
        pass


def connect_error_result(exc: OSError, host: str, port: int) -> Result:
    """Maps a failed connect (plain or TLS) onto the shared reasons."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Result.fail("tls", f"certificate of {host}:{port} not accepted: {exc.verify_message or exc}")
    if isinstance(exc, ssl.SSLError):
        return Result.fail("tls", f"TLS handshake with {host}:{port} failed: {exc.reason or exc}")
    if isinstance(exc, socket.gaierror):
        return Result.fail("dns", f"{host} did not resolve: {exc.strerror or exc}")
    return Result.fail("connect", f"cannot connect to {host}:{port}: {exc.strerror or exc}")


class TcpProbe(Probe[TcpSettings]):
    settings_model = TcpSettings

    def __init__(self, settings: TcpSettings) -> None:
        super().__init__(settings)
        self._expect = re.compile(settings.expect.encode()) if settings.expect is not None else None
        self._ssl = client_tls_context(settings.verify_tls, settings.ca_file) if settings.tls else None

    async def run(self, timer: PhaseTimer) -> Result:
        settings = self.settings
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
                return await self._exchange(reader, writer)
        except OSError as exc:
            return Result.fail("connect", f"connection to {settings.host}:{settings.port} lost: {exc.strerror or exc}")
        finally:
            await close_writer(writer)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Result:
        settings = self.settings
        if settings.send is not None:
            writer.write(settings.send.encode())
            await writer.drain()
        if self._expect is None:
            return Result.ok(f"sent {len(settings.send or '')} bytes to {settings.host}:{settings.port}")
        reply = await self._read_until_match(reader)
        shown = reply[:_SHOWN_REPLY].decode("utf-8", "replace")
        if self._expect.search(reply):
            return Result.ok(f"reply matched /{settings.expect}/", checks=(Check(True, f"[REPLY] matches /{settings.expect}/"),))
        why = "the reply grew past max_read_bytes" if len(reply) >= settings.max_read_bytes else "the peer closed the connection"
        return Result.fail(
            "assertion",
            f"reply does not match /{settings.expect}/ ({why}); got {len(reply)} bytes: {shown!r}",
            checks=(Check(False, f"[REPLY] matches /{settings.expect}/"),),
        )

    async def _read_until_match(self, reader: asyncio.StreamReader) -> bytes:
        """Reads until the pattern matches, the peer closes, or `max_read_bytes` arrived; the runner bounds the time."""
        assert self._expect is not None
        limit = self.settings.max_read_bytes
        reply = b""
        while len(reply) < limit:
            chunk = await reader.read(min(_READ_CHUNK, limit - len(reply)))
            if not chunk:
                break
            reply += chunk
            if self._expect.search(reply):
                break
        return reply
