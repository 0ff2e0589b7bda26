"""`tls` probe: a TLS handshake, timed apart from TCP connect, judged on trust, host name and days to expiry.

The runbooks check certificates before they expire; this probe exports the earliest notAfter of the
served chain (leaf and intermediates) as `canary_probe_tls_certificate_expiry_timestamp_seconds`, so alerts
can also be written on the figure itself.

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

from canary.contract import Gauge, PhaseTimer, Probe, ProbeSettings, Result
from probes.transport import CaFile, certificate_problem, client_tls_context, close_writer, connect_error_result

_INSPECT_TIMEOUT = 3.0
_DAY = 86400.0
class TlsSettings(ProbeSettings):
    type: Literal["tls"] = "tls"
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(default=443, ge=1, le=65535)
    server_name: str | None = None
    verify: bool = True
    ca_file: CaFile | None = None
    min_days_remaining: float = Field(default=14, ge=0)

    def target(self) -> str:
        sni = f" (SNI {self.server_name})" if self.server_name else ""
        return f"tls {self.host}:{self.port}{sni}"


class TlsProbe(Probe[TlsSettings]):
    settings_model = TlsSettings
    reasons = ("dns", "connect", "tls", "expiry")
    figure_labels = frozenset({"version"})
    libraries = ("cryptography.x509",)

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
        not_after = chain_not_after(ssl_object)
        gauges = [Gauge("tls_version_info", 1, "The TLS version negotiated, as the version label.",
                        (("version", _version_label(version)),))]
        if not_after is None:
            return Result.fail("internal", "the server sent no certificate whose dates could be read",
                               gauges=tuple(gauges))
        gauges.append(_expiry_gauge(not_after))
        days = (not_after - time.time()) / _DAY
        limit = self.settings.min_days_remaining
        summary = f"{version}, certificate chain of {self._server_name} valid until {_iso(not_after)}"
        if days < 0:
            return Result.fail("expiry", f"{summary}: expired {-days:.1f} days ago", gauges=tuple(gauges))
        if days < limit:
            return Result.fail("expiry", f"{summary}: {days:.1f} days left, fewer than min_days_remaining "
                                         f"({limit:g})", gauges=tuple(gauges))
        return Result.ok(f"{summary} ({days:.0f} days left)", gauges=tuple(gauges))

    async def _verify_failed(self, exc: ssl.SSLCertVerificationError) -> Result:
        message = f"certificate of {self._where()} not accepted: {certificate_problem(exc)}"
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
            return chain_not_after(writer.get_extra_info("ssl_object"))
        finally:
            await close_writer(writer)

    def _where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"


def chain_not_after(ssl_object: ssl.SSLObject) -> float | None:
    """The earliest notAfter of the peer's certificate chain as a Unix time (the leaf's alone where the chain
    cannot be read): an intermediate that expires first breaks the site just as surely as the leaf.

    Python 3.13 exposes the chain as `get_verified_chain()`/`get_unverified_chain()`; 3.10-3.12 have the same
    methods on the SSL object's `_sslobj`. A chain that failed verification is only available unverified.
    """
    times = [t for t in (_not_after(cert) for cert in _peer_chain(ssl_object)) if t is not None]
    if times:
        return min(times)
    return leaf_not_after(ssl_object)


def _peer_chain(ssl_object: ssl.SSLObject) -> list[object]:
    for owner in (ssl_object, getattr(ssl_object, "_sslobj", None)):
        for method in ("get_verified_chain", "get_unverified_chain"):
            getter = getattr(owner, method, None)
            if getter is None:
                continue
            try:
                chain = getter()
            except (ssl.SSLError, ValueError):
                continue
            if chain:
                return list(chain)
    return []


def _not_after(cert: object) -> float | None:
    """notAfter of one chain entry: DER bytes (3.13) or an `_ssl.Certificate` (3.10-3.12)."""
    if isinstance(cert, (bytes, bytearray)):
        return _der_not_after(bytes(cert))
    get_info = getattr(cert, "get_info", None)
    info = get_info() if get_info is not None else None
    if isinstance(info, dict) and "notAfter" in info:
        return float(ssl.cert_time_to_seconds(info["notAfter"]))
    return None


def leaf_not_after(ssl_object: ssl.SSLObject) -> float | None:
    """The leaf certificate's notAfter as a Unix time.

    A verified handshake hands the parsed certificate out; an unverified one only the DER bytes, which
    need the `cryptography` package to read.
    """
    parsed = ssl_object.getpeercert()
    if parsed and "notAfter" in parsed:
        return float(ssl.cert_time_to_seconds(parsed["notAfter"]))
    der = ssl_object.getpeercert(binary_form=True)
    return _der_not_after(der) if der else None


def _der_not_after(der: bytes) -> float | None:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()


def _expiry_gauge(not_after: float) -> Gauge:
    return Gauge("tls_certificate_expiry_timestamp_seconds", not_after,
                 "When the first certificate of the server's chain expires, as a Unix time.")


_KNOWN_VERSIONS = {"TLSv1": "TLS 1.0", "TLSv1.1": "TLS 1.1", "TLSv1.2": "TLS 1.2", "TLSv1.3": "TLS 1.3"}


def _version_label(version: str) -> str:
    """blackbox_exporter's `probe_tls_version_info` values ("TLS 1.3"); a bounded set, never free text."""
    return _KNOWN_VERSIONS.get(version, "unknown")


def _ssl_detail(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc) or type(exc).__name__


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
