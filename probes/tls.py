"""`tls` probe: a TLS handshake, timed apart from TCP connect, judged on trust, host name and days to expiry.

The runbooks check certificates before they expire; this probe exports the certificate's notAfter as
`canary_probe_tls_certificate_expiry_timestamp_seconds`, so alerts can also be written on the figure itself.

Only the leaf (the server's own certificate) is read: Python 3.11's ssl module exposes the peer's chain
only from 3.13 on (`get_verified_chain`). An expired intermediate still fails verification, so it is
caught as `tls`; only an intermediate that expires *soon* goes unseen.

When verification fails, a second handshake that verifies nothing reads the certificate's dates anyway,
so an expired or untrusted certificate still reports when it expires.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from datetime import datetime, timezone
from typing import Literal

from pydantic import Field

from canary.phases import PhaseTimer
from canary.result import Gauge, Result
from probes.base import Probe, ProbeSettings
from probes.tcp import client_tls_context, close_writer, connect_error_result

_INSPECT_TIMEOUT = 3.0
_DAY = 86400.0
# OpenSSL verify codes (X509_V_ERR_*) that name the problem better than "verify failed".
_VERIFY_PROBLEMS = {
    9: "not yet valid",
    10: "expired",
    18: "self-signed (untrusted)",
    19: "untrusted (self-signed certificate in the chain)",
    20: "untrusted (issuer not in the trusted CAs)",
    21: "untrusted (issuer not in the trusted CAs)",
    62: "issued for another host name",
    64: "issued for another IP address",
}


class TlsSettings(ProbeSettings):
    type: Literal["tls"] = "tls"
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(default=443, ge=1, le=65535)
    server_name: str | None = None
    verify: bool = True
    ca_file: str | None = None
    min_days_remaining: float = Field(default=14, ge=0)

    def target(self) -> str:
        sni = f" (SNI {self.server_name})" if self.server_name else ""
        return f"tls {self.host}:{self.port}{sni}"


class TlsProbe(Probe[TlsSettings]):
    settings_model = TlsSettings

    def __init__(self, settings: TlsSettings) -> None:
        super().__init__(settings)
        self._context = client_tls_context(settings.verify, settings.ca_file)
        self._server_name = settings.server_name or settings.host

    async def run(self, timer: PhaseTimer) -> Result:
        settings = self.settings
        timer.begin("connect")
        try:
            reader, writer = await asyncio.open_connection(settings.host, settings.port)
        except OSError as exc:
            return connect_error_result(exc, settings.host, settings.port)
        timer.end("connect")
        try:
            with timer.phase("tls"):
                await writer.start_tls(self._context, server_hostname=self._server_name)
        except ssl.SSLCertVerificationError as exc:
            await close_writer(writer)
            return await self._verify_failed(exc)
        except OSError as exc:  # ssl.SSLError, or the peer closing mid-handshake
            await close_writer(writer)
            return Result.fail("tls", f"TLS handshake with {self._where()} failed: {_ssl_detail(exc)}")
        try:
            return self._judge(writer.get_extra_info("ssl_object"))
        finally:
            await close_writer(writer)

    def _judge(self, ssl_object: ssl.SSLObject) -> Result:
        version = ssl_object.version() or "unknown"
        not_after = leaf_not_after(ssl_object)
        gauges = [Gauge("tls_protocol_version", _version_number(version),
                        "TLS protocol version negotiated (1.2, 1.3; 0 when unknown).")]
        if not_after is None:
            return Result.fail("internal", "the certificate's dates could not be read (verify is off and the "
                                           "cryptography package is not installed)", gauges=tuple(gauges))
        gauges.append(_expiry_gauge(not_after))
        days = (not_after - time.time()) / _DAY
        limit = self.settings.min_days_remaining
        summary = f"{version}, certificate of {self._server_name} valid until {_iso(not_after)}"
        if days < 0:
            return Result.fail("expiry", f"{summary}: expired {-days:.1f} days ago", gauges=tuple(gauges))
        if days < limit:
            return Result.fail("expiry", f"{summary}: {days:.1f} days left, fewer than min_days_remaining "
                                         f"({limit:g})", gauges=tuple(gauges))
        return Result.ok(f"{summary} ({days:.0f} days left)", gauges=tuple(gauges))

    async def _verify_failed(self, exc: ssl.SSLCertVerificationError) -> Result:
        problem = _VERIFY_PROBLEMS.get(exc.verify_code, "not trusted")
        message = f"certificate of {self._where()} not accepted: {problem} ({exc.verify_message or exc.reason})"
        not_after = await self._inspect_unverified()
        if not_after is None:
            return Result.fail("tls", message)
        return Result.fail("tls", f"{message}; it is valid until {_iso(not_after)}", gauges=(_expiry_gauge(not_after),))

    async def _inspect_unverified(self) -> float | None:
        """A second handshake that trusts anything, only to read the dates of a certificate that failed."""
        settings = self.settings
        bound = min(_INSPECT_TIMEOUT, (settings.timeout or 2 * _INSPECT_TIMEOUT) / 2)
        try:
            async with asyncio.timeout(bound):
                _, writer = await asyncio.open_connection(
                    settings.host, settings.port, ssl=client_tls_context(False, None), server_hostname=self._server_name
                )
        except (OSError, TimeoutError):
            return None
        try:
            return leaf_not_after(writer.get_extra_info("ssl_object"))
        finally:
            await close_writer(writer)

    def _where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"


def leaf_not_after(ssl_object: ssl.SSLObject) -> float | None:
    """The leaf certificate's notAfter as a Unix time.

    A verified handshake hands the parsed certificate out; an unverified one only the DER bytes, which
    need the `cryptography` package to read (it is optional: without it the dates stay unknown).
    """
    parsed = ssl_object.getpeercert()
    if parsed and "notAfter" in parsed:
        return float(ssl.cert_time_to_seconds(parsed["notAfter"]))
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        from cryptography import x509
    except ImportError:
        return None
    return x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()


def _expiry_gauge(not_after: float) -> Gauge:
    return Gauge("tls_certificate_expiry_timestamp_seconds", not_after,
                 "When the server's (leaf) certificate expires, as a Unix time.")


def _version_number(version: str) -> float:
    try:
        return float(version.removeprefix("TLSv"))
    except ValueError:
        return 0.0


def _ssl_detail(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc) or type(exc).__name__


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
