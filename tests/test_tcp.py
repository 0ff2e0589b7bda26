"""The `tcp` probe against real asyncio servers on 127.0.0.1: connect, send/expect, bounded reads, TLS."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest
import trustme
from pydantic import ValidationError

from canary.config import load_config
from canary.contract import Result
from canary.runner import run_once
from canary.scrub import Scrubber
from probes import PROBE_TYPES
from probes.tcp import TcpProbe, TcpSettings
from tests.conftest import free_port, write_config

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Served:
    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[bytes] = []
        self.connections = 0


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler, context: ssl.SSLContext | None = None) -> Served:
        served = Served(free_port())

        async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            served.connections += 1
            try:
                await handler(reader, writer)
            except (ConnectionError, OSError):
                pass  # the probe hung up first
            finally:
                writer.close()

        servers.append(await asyncio.start_server(wrapped, "127.0.0.1", served.port, ssl=context))
        return served

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def _echo(served_ref: list[Served]) -> Handler:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        served_ref[0].received.append(line)
        writer.write(b"+" + line)
        await writer.drain()

    return echo


async def _banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 mail.example ESMTP ready\r\n")
    await writer.drain()


async def _flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    for _ in range(64):  # 64 KiB at most; the probe stops reading long before
        writer.write(b"x" * 1024)
        await writer.drain()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await reader.read(1024):  # ends when the probe hangs up
        pass


def _settings(port: int, **extra: object) -> TcpSettings:
    return TcpSettings(name="port", channel="broker", host="127.0.0.1", port=port, **extra)


async def _run(settings: TcpSettings, timeout: float = 5.0) -> Result:
    return await run_once(TcpProbe(settings), timeout, Scrubber(settings.secret_values()))


async def _echo_server(serve: Callable[..., Awaitable[Served]], context: ssl.SSLContext | None = None) -> Served:
    ref: list[Served] = []
    served = await serve(_echo(ref), context)
    ref.append(served)
    return served


async def test_connect_only_passes(serve: Callable[..., Awaitable[Served]]) -> None:
    served = await serve(_silent)
    result = await _run(_settings(served.port))
    assert result.success, result.message
    assert "connect" in result.phases and "exchange" not in result.phases
    assert served.connections == 1


async def test_closed_port_fails_with_connect() -> None:
    result = await _run(_settings(free_port()))
    assert (result.success, result.reason) == (False, "connect")
    assert "cannot connect to 127.0.0.1" in result.message


async def test_unresolvable_host_fails_with_dns() -> None:
    result = await _run(TcpSettings(name="p", channel="c", host="no-such-host.invalid", port=80))
    assert (result.success, result.reason) == (False, "dns")


async def test_send_and_expect_passes(serve: Callable[..., Awaitable[Served]]) -> None:
    served = await _echo_server(serve)
    result = await _run(_settings(served.port, send="PING canary\r\n", expect=r"^\+PING canary"))
    assert result.success, result.message
    assert served.received == [b"PING canary\r\n"]
    assert {"connect", "exchange"} <= set(result.phases)
    assert result.checks[0].passed


async def test_expect_mismatch_fails_with_assertion(serve: Callable[..., Awaitable[Served]]) -> None:
    served = await _echo_server(serve)
    result = await _run(_settings(served.port, send="PING\r\n", expect="PONG"))
    assert (result.success, result.reason) == (False, "assertion")
    assert "does not match /PONG/" in result.message
    assert "'+PING\\r\\n'" in result.message  # what came back is shown
    assert "peer closed" in result.message


async def test_banner_is_read_without_sending(serve: Callable[..., Awaitable[Served]]) -> None:
    served = await serve(_banner)
    assert (await _run(_settings(served.port, expect=r"^220 "))).success
    wrong = await _run(_settings(served.port, expect=r"^554 "))
    assert (wrong.reason, "220 mail.example" in wrong.message) == ("assertion", True)


async def test_read_stops_at_max_read_bytes(serve: Callable[..., Awaitable[Served]]) -> None:
    served = await serve(_flood)
    result = await _run(_settings(served.port, expect="never", max_read_bytes=2048))
    assert (result.success, result.reason) == (False, "assertion")
    assert "got 2048 bytes" in result.message and "max_read_bytes" in result.message


async def test_silent_peer_times_out_during_exchange(serve: Callable[..., Awaitable[Served]]) -> None:
    served = await serve(_silent)
    result = await _run(_settings(served.port, expect="hello"), timeout=0.3)
    assert result.reason == "timeout"
    assert result.message.endswith("during exchange"), result.message


async def test_send_without_expect_passes(serve: Callable[..., Awaitable[Served]]) -> None:
    served = await _echo_server(serve)
    result = await _run(_settings(served.port, send="hello\n"))
    assert result.success, result.message
    await asyncio.sleep(0.05)  # let the server's handler record the line
    assert served.received == [b"hello\n"]


@pytest.fixture
def tls_pair(tmp_path: Path) -> tuple[ssl.SSLContext, str]:
    authority = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    return context, str(ca_file)


async def test_tls_exchange_passes_with_ca_file(
    serve: Callable[..., Awaitable[Served]], tls_pair: tuple[ssl.SSLContext, str]
) -> None:
    context, ca_file = tls_pair
    served = await _echo_server(serve, context)
    result = await _run(_settings(served.port, tls=True, ca_file=ca_file, send="PING\n", expect=r"\+PING"))
    assert result.success, result.message
    assert served.received == [b"PING\n"]


async def test_tls_untrusted_fails_with_tls(
    serve: Callable[..., Awaitable[Served]], tls_pair: tuple[ssl.SSLContext, str]
) -> None:
    context, _ = tls_pair
    served = await _echo_server(serve, context)
    result = await _run(_settings(served.port, tls=True))
    assert (result.success, result.reason) == (False, "tls")
    assert "not accepted" in result.message
    assert (await _run(_settings(served.port, tls=True, verify_tls=False))).success


def test_settings_load_from_toml(tmp_path: Path) -> None:
    path = write_config(tmp_path, r"""
        [[probes]]
        name = "smtp"
        type = "tcp"
        channel = "email"
        host = "mail.example"
        port = 25
        expect = "^220 "
    """)
    settings = load_config(path, PROBE_TYPES, environ={}).probes[0]
    assert isinstance(settings, TcpSettings)
    assert (settings.max_read_bytes, settings.tls, settings.send) == (4096, False, None)
    assert settings.target() == "tcp mail.example:25"


@pytest.mark.parametrize("bad", [{"expect": "("}, {"port": 70000}, {"max_read_bytes": 0}, {"sned": "x"}])
def test_settings_reject_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        TcpSettings(name="p", channel="c", host="h", **{"port": 1, **bad})


@pytest.fixture
def mute_tls_peer(tls_pair: tuple[ssl.SSLContext, str]):  # type: ignore[no-untyped-def]
    """A TLS server (in a thread, blocking sockets) that completes the handshake, then never reads or answers the
    client's close_notify, for up to 10 s per connection: the peer that once held a reload forever."""
    import socket
    import threading

    context, ca_file = tls_pair
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve_forever() -> None:
        held = []
        deadline = __import__("time").monotonic() + 60
        while not stop.is_set() and __import__("time").monotonic() < deadline:
            try:
                raw, _ = listener.accept()
            except OSError:
                continue
            try:
                held.append(context.wrap_socket(raw, server_side=True))
            except (OSError, ssl.SSLError):
                raw.close()
        for conn in held:
            conn.close()

    thread = threading.Thread(target=serve_forever, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], ca_file
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


async def test_a_reload_is_not_held_by_a_tls_peer_that_never_closes(mute_tls_peer) -> None:  # type: ignore[no-untyped-def]
    from canary.scheduler import STOP_TIMEOUT, Scheduler
    from canary.state import ResultStore

    port, ca_file = mute_tls_peer

    class Observer:
        def observe_lateness(self, seconds: float) -> None: ...
        def count_skipped(self, name: str, slots: int, reason: str) -> None: ...
        def count_starved(self, name: str) -> None: ...

    before = _settings(port, tls=True, ca_file=ca_file, interval="5s", timeout="4s")
    store = ResultStore((1.0,), 5)
    store.sync([before], (1.0,), 5)
    scheduler = Scheduler(store, TcpProbe, Observer())
    await scheduler.apply((before,), 0.01, Scrubber())
    try:
        await asyncio.sleep(0.7)  # connected, and now waiting for the peer's close_notify in close_writer
        old_task = scheduler._running["port"].task
        started = asyncio.get_running_loop().time()
        await scheduler.apply((_settings(port, tls=True, ca_file=ca_file, interval="6s", timeout="4s"),), 0.01, Scrubber())
        took = asyncio.get_running_loop().time() - started
        assert took < STOP_TIMEOUT  # the old task ended when cancelled; it was not abandoned after the bound
        assert not scheduler._abandoned
        assert old_task.cancelled()  # the cancellation went through close_writer instead of being swallowed
    finally:
        await scheduler.stop(grace=0)
