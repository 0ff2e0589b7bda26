"""The `tls` probe against real asyncio TLS servers on 127.0.0.1, with certificates made here by trustme."""

from __future__ import annotations

import asyncio
import ssl
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest
import trustme
from cryptography import x509
from pydantic import ValidationError

from canary.config import load_config
from canary.contract import Result
from canary.runner import run_once
from canary.scrub import Scrubber
from probes import PROBE_TYPES
from probes.tls import TlsProbe, TlsSettings
from tests.conftest import free_port, write_config

DAY = 86400.0
Serve = Callable[[trustme.LeafCert | None], Awaitable[int]]


def _issue(authority: trustme.CA, kind: str) -> trustme.LeafCert:
    now = datetime.now(timezone.utc)
    if kind == "expired":
        return authority.issue_cert("127.0.0.1", not_before=now - timedelta(days=10), not_after=now - timedelta(days=1))
    if kind == "soon":
        return authority.issue_cert("127.0.0.1", not_before=now - timedelta(days=1), not_after=now + timedelta(days=3))
    if kind == "other_host":
        return authority.issue_cert("other.example")
    if kind == "named":
        return authority.issue_cert("canary.example")
    return authority.issue_cert("127.0.0.1")


def _not_after(cert: trustme.LeafCert) -> float:
    leaf = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())
    return leaf.not_valid_after_utc.timestamp()


@pytest.fixture
def ca(tmp_path: Path) -> tuple[trustme.CA, str]:
    authority = trustme.CA()
    path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, str(path)


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts TLS servers (or, given no certificate, a plain server that answers with non-TLS bytes)."""
    servers: list[asyncio.Server] = []
    handshakes: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        handshakes.append(ssl_object.version() if ssl_object else "plain")
        if ssl_object is None:
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        writer.close()

    async def start(cert: trustme.LeafCert | None) -> int:
        context = None
        if cert is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert.configure_cert(context)
        port = free_port()
        servers.append(await asyncio.start_server(handle, "127.0.0.1", port, ssl=context))
        return port

    start.handshakes = handshakes  # type: ignore[attr-defined]
    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def _settings(port: int, ca_file: str | None = None, **extra: object) -> TlsSettings:
    return TlsSettings(name="cert", channel="tls", host="127.0.0.1", port=port, ca_file=ca_file, **extra)


async def _run(settings: TlsSettings, timeout: float = 5.0) -> Result:
    return await run_once(TlsProbe(settings), timeout, Scrubber(settings.secret_values()))


def _gauge(result: Result, name: str) -> float:
    values = [gauge.value for gauge in result.gauges if gauge.name == name]
    assert len(values) == 1, f"expected one {name} gauge in {result.gauges}"
    return values[0]


async def test_valid_certificate_passes_with_expiry_and_version(serve: Serve, ca: tuple[trustme.CA, str]) -> None:
    authority, ca_file = ca
    cert = _issue(authority, "valid")
    result = await _run(_settings(await serve(cert), ca_file))
    assert result.success, result.message
    assert set(result.phases) >= {"connect", "tls"}
    assert _gauge(result, "tls_certificate_expiry_timestamp_seconds") == pytest.approx(_not_after(cert), abs=1)
    info = [g for g in result.gauges if g.name == "tls_version_info"]
    assert [(g.value, g.labels) for g in info] == [(1, (("version", "TLS 1.3"),))]
    assert "TLSv1.3" in result.message and "days left" in result.message
    assert serve.handshakes == ["TLSv1.3"]  # type: ignore[attr-defined]


async def test_expiring_soon_fails_with_expiry(serve: Serve, ca: tuple[trustme.CA, str]) -> None:
    authority, ca_file = ca
    cert = _issue(authority, "soon")
    result = await _run(_settings(await serve(cert), ca_file))
    assert (result.success, result.reason) == (False, "expiry")
    assert "fewer than min_days_remaining (14)" in result.message
    assert "2.9 days left" in result.message or "3.0 days left" in result.message
    expiry = _gauge(result, "tls_certificate_expiry_timestamp_seconds")
    assert expiry == pytest.approx(time.time() + 3 * DAY, abs=120)


async def test_expiring_soon_passes_under_a_smaller_minimum(serve: Serve, ca: tuple[trustme.CA, str]) -> None:
    authority, ca_file = ca
    result = await _run(_settings(await serve(_issue(authority, "soon")), ca_file, min_days_remaining=2))
    assert result.success, result.message


async def test_expired_certificate_fails_verification_and_still_reports_its_expiry(
    serve: Serve, ca: tuple[trustme.CA, str]
) -> None:
    authority, ca_file = ca
    cert = _issue(authority, "expired")
    result = await _run(_settings(await serve(cert), ca_file))
    assert (result.success, result.reason) == (False, "tls")
    assert "not accepted: expired" in result.message
    assert "valid until" in result.message
    assert _gauge(result, "tls_certificate_expiry_timestamp_seconds") == pytest.approx(_not_after(cert), abs=1)
    assert "tls" in result.phases


async def test_expired_certificate_without_verification_fails_with_expiry(
    serve: Serve, ca: tuple[trustme.CA, str]
) -> None:
    authority, _ = ca
    cert = _issue(authority, "expired")
    result = await _run(_settings(await serve(cert), None, verify=False))
    assert (result.success, result.reason) == (False, "expiry")
    assert "expired 1.0 days ago" in result.message
    assert _gauge(result, "tls_certificate_expiry_timestamp_seconds") == pytest.approx(_not_after(cert), abs=1)


async def test_wrong_host_fails_with_tls(serve: Serve, ca: tuple[trustme.CA, str]) -> None:
    authority, ca_file = ca
    result = await _run(_settings(await serve(_issue(authority, "other_host")), ca_file))
    assert (result.success, result.reason) == (False, "tls")
    assert "issued for another IP address" in result.message
    assert "127.0.0.1" in result.message


async def test_server_name_override_verifies_against_that_name(serve: Serve, ca: tuple[trustme.CA, str]) -> None:
    authority, ca_file = ca
    port = await serve(_issue(authority, "named"))
    assert (await _run(_settings(port, ca_file, server_name="canary.example"))).success
    wrong = await _run(_settings(port, ca_file, server_name="other.example"))
    assert (wrong.reason, "issued for another host name" in wrong.message) == ("tls", True)


async def test_untrusted_ca_fails_with_tls(serve: Serve, ca: tuple[trustme.CA, str]) -> None:
    _, ca_file = ca
    stranger = trustme.CA()  # a CA the probe was not told to trust: the "self-signed" case
    cert = _issue(stranger, "valid")
    result = await _run(_settings(await serve(cert), ca_file))
    assert (result.success, result.reason) == (False, "tls")
    assert "untrusted" in result.message
    assert _gauge(result, "tls_certificate_expiry_timestamp_seconds") == pytest.approx(_not_after(cert), abs=1)


async def test_untrusted_ca_passes_without_verification(serve: Serve) -> None:
    result = await _run(_settings(await serve(_issue(trustme.CA(), "valid")), None, verify=False))
    assert result.success, result.message


async def test_system_trust_store_rejects_a_private_ca(serve: Serve, ca: tuple[trustme.CA, str]) -> None:
    authority, _ = ca
    result = await _run(_settings(await serve(_issue(authority, "valid")), None))
    assert (result.reason, "untrusted" in result.message) == ("tls", True)


async def test_closed_port_fails_with_connect() -> None:
    result = await _run(_settings(free_port()))
    assert (result.success, result.reason) == (False, "connect")
    assert "cannot connect to 127.0.0.1" in result.message


async def test_plain_server_fails_the_handshake(serve: Serve) -> None:
    result = await _run(_settings(await serve(None)))
    assert (result.success, result.reason) == (False, "tls")
    assert "handshake" in result.message
    assert serve.handshakes == ["plain"]  # type: ignore[attr-defined]


async def test_silent_server_times_out_during_tls() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1 << 16):  # takes the ClientHello, never answers; ends when the probe hangs up
            pass
        writer.close()

    port = free_port()
    server = await asyncio.start_server(silent, "127.0.0.1", port)
    try:
        result = await _run(_settings(port), timeout=0.3)
    finally:
        server.close()
        await server.wait_closed()
    assert result.reason == "timeout"
    assert result.message.endswith("during tls"), result.message
    assert "connect" in result.phases


def test_settings_load_from_toml_with_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        [[probes]]
        name = "cert"
        type = "tls"
        channel = "web"
        host = "support.example.com"
    """)
    settings = load_config(path, PROBE_TYPES, environ={}).probes[0]
    assert isinstance(settings, TlsSettings)
    assert (settings.port, settings.verify, settings.min_days_remaining, settings.server_name) == (443, True, 14, None)
    assert settings.target() == "tls support.example.com:443"


@pytest.mark.parametrize("bad", [{"min_days_remaining": -1}, {"port": 0}, {"verfy": False}])
def test_settings_reject_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        TlsSettings(name="cert", channel="tls", host="h", **bad)


async def test_the_chain_s_earliest_expiry_counts_not_only_the_leaf(serve: Serve, ca: tuple[trustme.CA, str]) -> None:
    # The leaf outlives its intermediate: the site breaks when the intermediate expires, so that date is exported.
    authority, ca_file = ca
    intermediate = authority.create_child_ca()
    leaf = intermediate.issue_cert("127.0.0.1", not_after=datetime(3005, 1, 1, tzinfo=timezone.utc))
    served = [x509.load_pem_x509_certificate(pem.bytes()).not_valid_after_utc.timestamp() for pem in leaf.cert_chain_pems]
    assert served[0] > min(served)  # the leaf is not the first to expire
    for verify in (True, False):
        result = await _run(_settings(await serve(leaf), ca_file=ca_file, verify=verify))
        assert result.success, result.message
        assert _gauge(result, "tls_certificate_expiry_timestamp_seconds") == min(served)
        assert "valid until 3000-01-01" in result.message
