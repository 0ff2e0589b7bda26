"""Hostile targets for the fault suite: real servers on 127.0.0.1, built to misbehave.

Raw `asyncio.start_server` servers where aiohttp's server cannot misbehave enough (accept and never answer, lie in
Content-Length, stream a chunked body without end, trickle bytes, put control characters in the status line);
aiohttp apps otherwise; trustme and `cryptography` for certificates that are expired, self-signed or for another
host. A `Neighbour` runs a fast, healthy probe beside a hostile one in the same event loop, to show that nothing a
target sends holds the loop.

Everything here is bounded: every handler gives up after `HOLD_SECONDS`, an "endless" body after
`ENDLESS_LIMIT_BYTES`, the neighbour after `Neighbour.MAX_RUNS`; and closing a server ends every connection it
accepted, so no test leaves a server or a connection behind.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import socket
import ssl
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from canary.contract import Result
from canary.runner import run_once
from canary.scrub import Scrubber
from probes.http import HttpProbe, HttpSettings
from tests.conftest import start_app

HOLD_SECONDS = 30.0  # the longest a hostile handler keeps a connection; a test closes its servers long before
ENDLESS_LIMIT_BYTES = 1 << 30  # an "endless" body stops here, far beyond every max_body_bytes
TRICKLE_EVERY = 0.05  # seconds between the bytes of a trickled body


# --- raw servers ----------------------------------------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "RawServer"], Awaitable[None]]


class RawServer:
    """A TCP server on 127.0.0.1 whose every connection is handed to `handler`. Counts connections and keeps the
    request heads it read; `close()` cancels every handler still running and drops its connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.sent_bytes = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "RawServer":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            async with asyncio.timeout(HOLD_SECONDS):
                await self.handler(reader, writer, self)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client gave up or the hold ran out: both expected
        except asyncio.CancelledError:
            pass  # close() ended it; a cancelled callback task would make asyncio's stream machinery log an error
        finally:
            self._tasks.discard(task)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a client that stopped reading must not keep this connection alive
            else:
                writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


async def read_head(reader: asyncio.StreamReader, server: RawServer) -> bytes:
    """One request's head (request line and headers), remembered by the server; the body, if any, is left unread.
    A head longer than the stream's limit (64 KiB) raises LimitOverrunError, which ends the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    server.requests.append(head)
    return head


async def _send(writer: asyncio.StreamWriter, server: RawServer, data: bytes) -> None:
    writer.write(data)
    server.sent_bytes += len(data)
    await writer.drain()  # backpressure: a client that stops reading stops us too


def never_answer() -> Handler:
    """Accepts the connection, reads the request, and never says a word."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: RawServer) -> None:
        await read_head(reader, server)
        await asyncio.sleep(HOLD_SECONDS)

    return handler


def endless_chunked(piece: int = 65536) -> Handler:
    """200 with a chunked body that never ends (until ENDLESS_LIMIT_BYTES or the hold runs out)."""
    data = b"a" * piece
    chunk = f"{piece:x}\r\n".encode() + data + b"\r\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: RawServer) -> None:
        await read_head(reader, server)
        await _send(writer, server, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
        while server.sent_bytes < ENDLESS_LIMIT_BYTES:
            await _send(writer, server, chunk)

    return handler


def lying_length(declared: int, body: bytes, then: str = "close") -> Handler:
    """200 declaring `Content-Length: declared` and sending `body` (more or fewer bytes), then `close` the
    connection or `hold` it open in silence."""
    assert then in ("close", "hold")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: RawServer) -> None:
        await read_head(reader, server)
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n".encode()
        await _send(writer, server, head + body)
        if then == "hold":
            await asyncio.sleep(HOLD_SECONDS)

    return handler


def trickle(status_line: bytes = b"HTTP/1.1 200 OK", headers: bytes = b"Content-Type: application/json\r\n",
            every: float = TRICKLE_EVERY) -> Handler:
    """Headers at once, then a chunked body of one byte every `every` seconds that never finishes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: RawServer) -> None:
        await read_head(reader, server)
        await _send(writer, server, status_line + b"\r\n" + headers + b"Transfer-Encoding: chunked\r\n\r\n")
        await _send(writer, server, b'1\r\n{\r\n')
        while True:  # bounded by the server's hold
            await asyncio.sleep(every)
            await _send(writer, server, b"1\r\n \r\n")

    return handler


def raw_answer(answer: bytes) -> Handler:
    """Sends exactly `answer` (status line, headers, body: whatever a test wrote) and closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: RawServer) -> None:
        await read_head(reader, server)
        await _send(writer, server, answer)

    return handler


def reset() -> Handler:
    """Reads the request, then drops the connection with a TCP reset (SO_LINGER 0) instead of answering."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: RawServer) -> None:
        await read_head(reader, server)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    return handler


def in_turn(*handlers: Handler) -> Handler:
    """The first connection gets the first handler, the second the second, …; the last handler takes the rest."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: RawServer) -> None:
        await handlers[min(server.connections, len(handlers)) - 1](reader, writer, server)

    return handler


def answer(status_line: str, headers: str = "", body: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer that closes its connection, for `raw_answer`."""
    head = f"HTTP/1.1 {status_line}\r\n{headers}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


def banner(text: bytes) -> Handler:
    """A TCP service that greets every connection with `text` and then waits (no HTTP at all)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: RawServer) -> None:
        await _send(writer, server, text)
        await asyncio.sleep(HOLD_SECONDS)

    return handler


class Servers:
    """Starts hostile servers on demand and closes every one of them afterwards (see the `servers` fixture)."""

    def __init__(self) -> None:
        self._raw: list[RawServer] = []
        self._runners: list[web.AppRunner] = []

    async def raw(self, handler: Handler) -> RawServer:
        server = await RawServer(handler).start()
        self._raw.append(server)
        return server

    async def app(self, app: web.Application, ssl_context: ssl.SSLContext | None = None) -> str:
        runner, url = await start_app(app, ssl_context=ssl_context)
        self._runners.append(runner)
        return url

    async def close(self) -> None:
        for server in reversed(self._raw):
            await server.close()
        for runner in reversed(self._runners):
            await runner.cleanup()


# --- certificates -----------------------------------------------------------------------------------------------------


@dataclass
class Certificates:
    """A private CA (its PEM at `ca_file`) and server contexts with the certificates the TLS cases need."""

    ca: trustme.CA
    ca_file: str
    directory: Path

    def context(self, kind: str) -> ssl.SSLContext:
        """A server context serving a certificate that is `valid`, `expired`, `other-host` (issued for
        other.example.test, not 127.0.0.1) or `self-signed` (its own issuer, no CA at all)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        now = dt.datetime.now(dt.timezone.utc)
        if kind == "self-signed":
            cert_file, key_file = self._self_signed()
            context.load_cert_chain(cert_file, key_file)
            return context
        if kind == "expired":
            leaf = self.ca.issue_cert("127.0.0.1", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=2))
        elif kind == "other-host":
            leaf = self.ca.issue_cert("other.example.test")
        else:
            assert kind == "valid", kind
            leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        leaf.configure_cert(context)
        return context

    def _self_signed(self) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256())
        )
        cert_file, key_file = self.directory / "self-signed.pem", self.directory / "self-signed.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return str(cert_file), str(key_file)


def certificates(directory: Path) -> Certificates:
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Certificates(ca, str(ca_file), directory)


# --- a healthy neighbour --------------------------------------------------------------------------------------------


OK_BODY = {"status": "healthy"}


def healthy_app() -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response(OK_BODY)

    app = web.Application()
    app.router.add_get("/ok", ok)
    return app


@dataclass
class Neighbour:
    """A fast http probe against a healthy server, run on a fixed grid every `interval` seconds in the same event loop
    as a hostile probe. Slots are never skipped, so a loop held for longer than a moment shows as lateness."""

    url: str
    interval: float = 0.5
    lateness: list[float] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    MAX_RUNS = 200  # bounded whatever happens; a test stops it long before

    async def __aenter__(self) -> "Neighbour":
        settings = HttpSettings.model_validate({
            "name": "neighbour", "type": "http", "channel": "api", "interval": f"{self.interval}s",
            "timeout": f"{self.interval}s", "url": f"{self.url}/ok", "expect_json": OK_BODY,
        })
        self._probe = HttpProbe(settings)
        self._task = asyncio.create_task(self._loop())
        await asyncio.sleep(0)  # let the first run start before the hostile one
        return self

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        slot = loop.time()
        for _ in range(self.MAX_RUNS):
            delay = slot - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.lateness.append(loop.time() - slot)
            self.results.append(await run_once(self._probe, self.interval, Scrubber()))
            slot += self.interval

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._probe.close()

    def assert_on_time(self, min_runs: int = 2) -> None:
        """The neighbour ran at least `min_runs` times, every run passed, and none started a whole interval late.

        A stall a hostile target causes lasts as long as its timeout (seconds); a loaded 2-core CI machine alone can
        delay a start by ~0.3 s, so the bound is the interval, not a fraction of it."""
        assert len(self.results) >= min_runs, f"the neighbour ran only {len(self.results)} times"
        failed = [r.message for r in self.results if not r.success]
        assert not failed, failed
        worst = max(self.lateness)
        assert worst < self.interval, f"the neighbour started {worst:.3f}s late (interval {self.interval}s)"


# --- an OpenAI-compatible provider that misbehaves on request ----------------------------------------------------------


@dataclass
class LlmBehaviour:
    """What the fake provider does; a test changes it between runs. `requests` is every call it received."""

    model: str = "canary-model"
    limited: int = 0  # how many of the next calls get a 429
    retry_after: str | None = None  # the 429's Retry-After header, verbatim
    completion: str = "ok"  # ok, invalid-json, empty-choices, trickle, flood, error-text
    completion_headers: dict[str, str] = field(default_factory=dict)
    error_text: str = ""  # the provider's error message for `error-text` (a 500)
    requests: list[str] = field(default_factory=list)


LLM = web.AppKey("llm", LlmBehaviour)


def llm_app(behaviour: LlmBehaviour) -> web.Application:
    """`GET /v1/models` and `POST /v1/chat/completions`, behaving as `behaviour` says at the moment of each call."""

    def limited() -> web.Response | None:
        if behaviour.limited <= 0:
            return None
        behaviour.limited -= 1
        headers = {"retry-after": behaviour.retry_after} if behaviour.retry_after is not None else {}
        return web.json_response({"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}},
                                 status=429, headers=headers)

    async def models(request: web.Request) -> web.Response:
        behaviour.requests.append(f"GET {request.path}")
        return limited() or web.json_response({"object": "list", "data": [{"id": behaviour.model, "active": True}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        behaviour.requests.append(f"POST {request.path}")
        refused = limited()
        if refused is not None:
            return refused
        mode = behaviour.completion
        if mode == "ok":
            return web.json_response({"choices": [{"message": {"role": "assistant", "content": "OK"}}]},
                                     headers=behaviour.completion_headers)
        if mode == "invalid-json":
            return web.Response(text='{"choices": [{"message": ', content_type="application/json")
        if mode == "empty-choices":
            return web.json_response({"id": "x", "object": "chat.completion", "choices": []})
        if mode == "error-text":
            return web.json_response({"error": {"message": behaviour.error_text, "code": "server_error"}}, status=500)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HOLD_SECONDS
        if mode == "trickle":  # headers, then a byte now and then, never the end
            await response.write(b"data: {")
            while loop.time() < deadline:
                await asyncio.sleep(TRICKLE_EVERY)
                await response.write(b" ")
        else:
            assert mode == "flood", mode
            piece = b"data: " + b"a" * 65536 + b"\n"
            sent = 0
            while loop.time() < deadline and sent < ENDLESS_LIMIT_BYTES:
                await response.write(piece)
                sent += len(piece)
        return response

    app = web.Application()
    app[LLM] = behaviour
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", completions)
    return app
