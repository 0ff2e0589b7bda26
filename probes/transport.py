"""The plumbing every probe that talks HTTP or TLS shares: URLs, CA files, TLS contexts, client sessions,
bounded body reads, closing connections, and mapping client errors onto the result reasons.

One place for each: a URL type whose password and secret query values are secrets and never shown, one cache of
TLS contexts (building one costs ~20 ms of CPU and ~800 KB, which neither 10,000 probes nor every failed
verification can each pay), and one table from aiohttp and socket errors to reasons.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import os
import re
import socket
import ssl
from http.cookies import BaseCookie
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Annotated, Any, AsyncIterator, Callable, Mapping, Sequence

import aiohttp
from aiohttp.typedefs import LooseCookies
from pydantic import AfterValidator, Field
from yarl import URL

from canary.contract import SECRET_NAME, HoldsSecrets, Result

_CLOSE_TIMEOUT = 2.0


# --- URLs -------------------------------------------------------------------------------------------------------


class Url(str, HoldsSecrets):
    """An absolute http(s) URL from the config. Its password and secret-looking query values (`?token=…`) are
    secrets: they are scrubbed from every output, and `for_humans()` shows the URL without them."""

    def secret_parts(self) -> list[str]:
        try:
            parsed = URL(str(self))
        except (ValueError, TypeError):
            return []
        found = [parsed.password] if parsed.password else []
        found += [value for name, value in parsed.query.items() if SECRET_NAME.search(name) and value]
        return found

    def for_humans(self) -> str:
        return url_for_humans(str(self))


def url_for_humans(url: str) -> str:
    """Scheme, host, port and path only: no credentials, query string or fragment in a message."""
    try:
        parsed = URL(url)
        return str(parsed.with_user(None).with_password(None).with_query(None).with_fragment(None)) if parsed.host else url
    except (ValueError, TypeError):
        return "<invalid URL>"


def http_url(url: str) -> Url:
    """`url` itself if it is an absolute http(s) URL; the ValueError every probe's settings report otherwise."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise ValueError("must be an absolute http:// or https:// URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"must be an absolute http:// or https:// URL, got {url_for_humans(url)!r}")
    return Url(url)


HttpUrl = Annotated[str, AfterValidator(http_url)]
"""An absolute http(s) URL; its credentials are secrets (see `Url`)."""


def secret_headers(headers: dict[str, str]) -> list[str]:
    """Values of headers whose names say they carry credentials (Authorization, API keys, cookies...)."""
    return [value for name, value in headers.items() if SECRET_NAME.search(name)]


# --- TLS ---------------------------------------------------------------------------------------------------------


def client_tls_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """A shared client context: verifying chain and host name (against `ca_file` or the system CAs), or with
    `verify` off accepting anything. A CA file that changed on disk gets a fresh context on the next build."""
    changed = 0
    if ca_file:
        try:
            changed = os.stat(ca_file).st_mtime_ns
        except OSError:
            changed = -1
    return _cached_context(verify, ca_file or None, changed)


@functools.lru_cache(maxsize=64)
def _cached_context(verify: bool, ca_file: str | None, changed: int) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


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


def certificate_problem(exc: BaseException) -> str:
    """What is wrong with a refused certificate, in the same words for every probe ("expired", "self-signed",
    "issued for another host name"), followed by OpenSSL's own text."""
    problem = _VERIFY_PROBLEMS.get(getattr(exc, "verify_code", None), "not trusted")  # type: ignore[arg-type]
    detail = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc)
    return f"{problem} ({detail})"


def _loadable_ca_file(path: str) -> str:
    try:
        client_tls_context(True, path)
    except (OSError, ssl.SSLError) as exc:
        detail = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise ValueError(f"cannot load the CA file {path!r} ({detail})") from None
    return path


CaFile = Annotated[str, Field(min_length=1), AfterValidator(_loadable_ca_file)]
"""A PEM bundle of trusted CAs, loaded at config load so a missing or broken file is a config error."""


# --- HTTP client ---------------------------------------------------------------------------------------------------


def _check_statuses(statuses: list[int | str]) -> list[int | str]:
    for status in statuses:
        if isinstance(status, int) and not 100 <= status <= 599:
            raise ValueError(f"status {status} is not between 100 and 599")
        if isinstance(status, str) and not re.fullmatch(r"[1-5]xx", status):
            raise ValueError(f"{status!r} is neither a status code nor a class such as \"2xx\"")
    return statuses


ExpectedStatuses = Annotated[list[int | str], Field(min_length=1), AfterValidator(_check_statuses)]
"""Status codes (200) and classes ("2xx") an answer may have."""


def status_matches(status: int, expected: list[int | str]) -> bool:
    return any(status == want if isinstance(want, int) else str(status)[0] == want[0] for want in expected)


MAX_RETRY_AFTER = 3600.0  # a bogus Retry-After must not silence a probe for days


def parse_retry_after(text: str | None, now: datetime | None = None) -> float | None:
    """RFC 9110 Retry-After: delay-seconds or an HTTP date, as seconds from now (never negative)."""
    if text is None or not text.strip():
        return None
    try:
        seconds = float(text.strip())
    except ValueError:
        try:
            when = parsedate_to_datetime(text.strip())
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def transient_wait(status: int, headers: Mapping[str, str]) -> float | None:
    """For a status that failed its check: whether another attempt may pass, as `Result.retry_after` says it.

    A 5xx is the server's own trouble, often passing: 0, the usual backoff. A 429 asks us to wait: its Retry-After
    (0 without one, or with one that is neither seconds nor a date). Anything else (a 401, a 404) is None: the same
    request will get the same answer."""
    if 500 <= status <= 599:
        return 0.0
    if status == 429:
        return parse_retry_after(headers.get("Retry-After")) or 0.0
    return None


class OriginCookieJar(aiohttp.CookieJar):
    """Cookies for one origin (scheme, host, port) only: those other origins set are dropped, none is sent to them.

    Cookies are credentials. RFC 6265 (and aiohttp's jar) scope them by host but not by port, so a plain jar would
    hand a platform's session cookie to another server on the same host; pinned to one origin it never crosses to
    another host, port or scheme, redirects included. aiohttp refuses cookies from IP-address hosts unless told
    they are safe; pinned like this they are, so a platform reached as 10.0.0.5 keeps its cookies too."""

    def __init__(self, origin: str) -> None:
        self._origin = URL(origin).origin()
        super().__init__(unsafe=_is_ip_literal(self._origin.host or ""))

    def _ours(self, url: URL) -> bool:
        try:
            return url.origin() == self._origin
        except ValueError:  # not an absolute http(s) URL
            return False

    def update_cookies(self, cookies: LooseCookies, response_url: URL = URL()) -> None:
        if self._ours(response_url):
            super().update_cookies(cookies, response_url)

    def update_cookies_from_headers(self, headers: Sequence[str], response_url: URL) -> None:
        if self._ours(response_url):
            super().update_cookies_from_headers(headers, response_url)

    def filter_cookies(self, request_url: URL = URL()) -> "BaseCookie[str]":
        return super().filter_cookies(request_url) if self._ours(request_url) else BaseCookie()

    def values(self) -> list[str]:
        """Every cookie value held, so a run can scrub them from what it reports."""
        return [morsel.value for morsel in self]


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def new_session(
    *,
    ssl_context: ssl.SSLContext | None = None,
    force_close: bool = False,
    limit: int = 4,
    headers: dict[str, str] | None = None,
    cookies_for: str | None = None,
    connector: aiohttp.BaseConnector | None = None,
) -> aiohttp.ClientSession:
    """A client session as probes use them: no timeout of its own (the runner owns the run's), and TLS through the
    shared contexts. No cookies are kept unless `cookies_for` names the one origin to keep them for (in a jar as
    fresh as the session, so nothing carries over from one run to the next when each run makes its own)."""
    return aiohttp.ClientSession(
        connector=connector or aiohttp.TCPConnector(
            ssl=ssl_context or client_tls_context(True, None), force_close=force_close, limit=limit,
        ),
        timeout=aiohttp.ClientTimeout(total=None),
        cookie_jar=OriginCookieJar(cookies_for) if cookies_for else aiohttp.DummyCookieJar(),
        headers=headers,
    )


async def read_limited(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, str]:
    """The body, or ("", why) when it is larger than `limit`: a hostile target cannot make us buffer without end."""
    declared = response.content_length
    if declared is not None and declared > limit and response.method != "HEAD":  # HEAD declares a body it never sends
        return b"", f"body of {declared} bytes is larger than max_body_bytes ({limit})"
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.content.iter_chunked(65536):
            size += len(chunk)
            if size > limit:
                return b"", f"body is larger than max_body_bytes ({limit})"
            chunks.append(chunk)
    except aiohttp.ClientPayloadError as exc:
        return b"", f"body could not be read: {exc}"
    return b"".join(chunks), ""


def client_error_result(exc: aiohttp.ClientError) -> Result:
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return Result.fail("tls", f"certificate not accepted: {certificate_problem(exc.certificate_error)}")
    if isinstance(exc, (aiohttp.ClientConnectorSSLError, aiohttp.ClientSSLError)):
        return Result.fail("tls", f"TLS handshake failed: {detail}")
    dns_error = getattr(aiohttp, "ClientConnectorDNSError", None)
    if dns_error is not None and isinstance(exc, dns_error):
        return Result.fail("dns", f"name did not resolve: {detail}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Result.fail("connect", f"cannot connect: {exc.os_error.strerror or detail}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return Result.fail("body", f"body could not be read: {detail}")
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        return Result.fail("connect", f"connection lost: {detail}")
    if isinstance(exc, aiohttp.ClientResponseError):
        return Result.fail("status", f"malformed answer: {detail}")
    return Result.fail("connect", f"request failed: {type(exc).__name__}: {detail}")


# --- raw connections -------------------------------------------------------------------------------------------------


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Closes a connection without letting a peer that never answers the TLS close hold the run.

    The wait is bounded; a cancellation of the caller (timeout, reload, stop) is never swallowed: the connection
    is closed either way, and the cancellation goes on."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), _CLOSE_TIMEOUT)
    except (OSError, TimeoutError):  # ssl.SSLError is an OSError; the socket is dropped below either way
        writer.transport.abort()
    except asyncio.CancelledError:
        writer.transport.abort()
        raise


def connect_error_result(exc: OSError, host: str, port: int) -> Result:
    """Maps a failed connect (plain or TLS) onto the shared reasons."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Result.fail("tls", f"certificate of {host}:{port} not accepted: {certificate_problem(exc)}")
    if isinstance(exc, ssl.SSLError):
        return Result.fail("tls", f"TLS handshake with {host}:{port} failed: {exc.reason or exc}")
    if isinstance(exc, socket.gaierror):
        return Result.fail("dns", f"{host} did not resolve: {exc.strerror or exc}")
    return Result.fail("connect", f"cannot connect to {host}:{port}: {exc.strerror or exc}")


class LazySession:
    """A probe's client session, made on its first run (inside the loop, off the build path) and remade if closed.

    Building it lazily keeps `build_probe` free of I/O, so a reload can build every new probe before it stops
    any old one."""

    def __init__(self, **options: object) -> None:
        self._options = options
        self._session: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = new_session(**self._options)  # type: ignore[arg-type]
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


# --- redirects -------------------------------------------------------------------------------------------------------

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class RedirectRefused(Exception):
    """A redirect that was not followed: to another host when that is not allowed, unreadable, or one too many."""


def without_credentials(headers: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in headers.items() if not SECRET_NAME.search(name)}


@asynccontextmanager
async def request_following_redirects(
    session: aiohttp.ClientSession,
    method: str,
    url: URL,
    *,
    headers: dict[str, str],
    data: Any = None,
    json: Any = None,
    follow: bool = True,
    max_redirects: int = 10,
    allow_other_host: bool = True,
    on_redirect: Callable[[], None] | None = None,
    **options: Any,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """The final response of a request whose redirects we follow ourselves, unlike aiohttp's, so that credentials
    never cross to another origin: a hop to another scheme, host or port drops every credential header first (aiohttp
    drops only Authorization), and a hop to another host is refused, when not allowed, before anything goes there."""
    first_host = url.host
    for _ in range(max_redirects + 1):
        async with session.request(
            method, url, headers=headers, data=data, json=json, allow_redirects=False, **options
        ) as response:
            location = response.headers.get("Location")
            if not (follow and response.status in REDIRECT_STATUSES and location):
                yield response
                return
            target = _redirect_target(url, location)
            if target.host != first_host and not allow_other_host:
                raise RedirectRefused(f"redirected to another host ({target.host}); allow_redirect_to_other_host is off")
            if target.origin() != url.origin():
                headers = without_credentials(headers)
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                method, data, json = ("HEAD" if method == "HEAD" else "GET"), None, None
            url = target
        if on_redirect is not None:
            on_redirect()
    raise RedirectRefused(f"more than {max_redirects} redirects")


def _redirect_target(current: URL, location: str) -> URL:
    try:
        target = current.join(URL(location))
    except ValueError:
        raise RedirectRefused(f"redirected to an unreadable Location {location[:80]!r}") from None
    if target.scheme not in ("http", "https") or not target.host:
        raise RedirectRefused(f"redirected to a non-HTTP location ({target.scheme or 'no scheme'})")
    return target
