"""The `http` probe against real aiohttp servers on 127.0.0.1: status, body, JSON, redirects, TLS, timeouts, secrets."""

from __future__ import annotations

import asyncio
import base64
import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import trustme
from aiohttp import web
from pydantic import ValidationError
from yarl import URL

from canary.contract import Result
from canary.runner import run_once
from canary.scrub import Scrubber
from probes.http import HttpProbe, HttpSettings
from tests.conftest import free_port, start_app

HANG_SECONDS = 30.0  # far beyond every timeout below; the runner's cleanup cancels it
SLOW_SECONDS = 1.0
SHORT_TIMEOUT = 0.3
HEALTHY = {"status": "healthy", "version": 3, "ok": True, "channels": {"email": "active", "whatsapp": "active"}}

REQUESTS = web.AppKey("requests", list)


# --- the target server ---------------------------------------------------------------------------------------------


def _record(request: web.Request, **extra: Any) -> None:
    request.app[REQUESTS].append(
        {"method": request.method, "path": request.path, "headers": dict(request.headers),
         "transport": request.transport, **extra}
    )


async def _ok(request: web.Request) -> web.Response:
    _record(request)
    return web.json_response(HEALTHY)


async def _json_doc(request: web.Request) -> web.Response:
    """Answers with the JSON document given in the `doc` query parameter, verbatim."""
    _record(request)
    return web.Response(text=request.query["doc"], content_type="application/json")


async def _status(request: web.Request) -> web.Response:
    _record(request)
    code = int(request.match_info["code"])
    headers = {"Location": "/ok"} if 300 <= code < 400 else {}
    return web.Response(status=code, text=f"status {code}", headers=headers)


async def _text(request: web.Request) -> web.Response:
    _record(request)
    return web.Response(text="<html><body>Welcome to the support portal. All systems normal.</body></html>",
                        content_type="text/html")


async def _malformed(request: web.Request) -> web.Response:
    _record(request)
    return web.Response(text='{"status": "healthy", "channels": {', content_type="application/json")


async def _slow_headers(request: web.Request) -> web.Response:
    _record(request)
    await asyncio.sleep(SLOW_SECONDS)
    return web.json_response(HEALTHY)


async def _hang(request: web.Request) -> web.Response:
    _record(request)
    await asyncio.sleep(HANG_SECONDS)
    return web.json_response(HEALTHY)


async def _slow_body(request: web.Request) -> web.StreamResponse:
    _record(request)
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(b'{"status": ')
    await asyncio.sleep(SLOW_SECONDS)
    await response.write(b'"healthy"}')
    await response.write_eof()
    return response


async def _sized(request: web.Request) -> web.Response:
    """`n` bytes with a Content-Length."""
    _record(request)
    return web.Response(body=b"x" * int(request.match_info["n"]), content_type="text/plain")


async def _streamed(request: web.Request) -> web.StreamResponse:
    """`n` bytes, chunked, so the client learns the size only by reading."""
    _record(request)
    remaining = int(request.match_info["n"])
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        while remaining > 0:  # bounded: n bytes in 16 KiB pieces
            piece = min(remaining, 16384)
            await response.write(b"x" * piece)
            remaining -= piece
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass  # the probe stopped reading once it had seen enough
    return response


async def _gzipped(request: web.Request) -> web.Response:
    """`n` zero bytes, gzip-compressed on the wire: small Content-Length, large once decompressed."""
    _record(request)
    response = web.Response(body=b"\0" * int(request.match_info["n"]), content_type="application/octet-stream")
    response.enable_compression(web.ContentCoding.gzip)
    return response


async def _redirect_chain(request: web.Request) -> web.Response:
    _record(request)
    left = int(request.match_info["n"])
    if left == 0:
        return web.json_response(HEALTHY)
    raise web.HTTPFound(f"/chain/{left - 1}")


async def _redirect_to(request: web.Request) -> web.Response:
    _record(request)
    raise web.HTTPFound(request.query["url"])


async def _echo(request: web.Request) -> web.Response:
    """Reports what it received: method, content type, the parsed JSON or form body, and the headers."""
    raw = await request.read()
    received: Any = None
    if request.content_type == "application/json":
        received = await request.json()
    elif request.content_type == "application/x-www-form-urlencoded":
        received = dict(await request.post())
    else:
        received = raw.decode()
    _record(request, content_type=request.content_type, received=received)
    return web.json_response({"method": request.method, "content_type": request.content_type, "received": received,
                              "marker": request.headers.get("X-Synthetic-Canary", "absent")})


async def _echo_credentials(request: web.Request) -> web.Response:
    """A careless server that repeats the caller's credentials back: in the reason phrase, or in a JSON field."""
    _record(request)
    authorization = request.headers.get("Authorization", "")
    if authorization.startswith("Basic "):
        authorization = base64.b64decode(authorization.removeprefix("Basic ")).decode()
    if request.query.get("mode") == "json":
        return web.json_response({"who": authorization})
    return web.Response(status=500, reason=f"refused {authorization}", text="no")


def build_target_app() -> web.Application:
    app = web.Application()
    app[REQUESTS] = []
    app.router.add_get("/ok", _ok)
    app.router.add_get("/doc", _json_doc)
    app.router.add_get("/status/{code}", _status)
    app.router.add_get("/text", _text)
    app.router.add_get("/malformed", _malformed)
    app.router.add_get("/slow-headers", _slow_headers)
    app.router.add_get("/hang", _hang)
    app.router.add_get("/slow-body", _slow_body)
    app.router.add_get("/sized/{n}", _sized)
    app.router.add_get("/streamed/{n}", _streamed)
    app.router.add_get("/gzipped/{n}", _gzipped)
    app.router.add_get("/chain/{n}", _redirect_chain)
    app.router.add_get("/to", _redirect_to)
    app.router.add_route("*", "/echo", _echo)
    app.router.add_get("/credentials", _echo_credentials)
    return app


# --- fixtures and helpers -----------------------------------------------------------------------------------------


Serve = Callable[..., Awaitable[tuple[web.Application, str]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts target servers on 127.0.0.1 on demand; every one is cleaned up (hanging handlers cancelled) after."""
    runners: list[web.AppRunner] = []

    async def _serve(ssl_context: ssl.SSLContext | None = None) -> tuple[web.Application, str]:
        app = build_target_app()
        runner, base = await start_app(app, ssl_context=ssl_context)
        runners.append(runner)
        return app, base

    try:
        yield _serve
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


@pytest.fixture
async def target(serve: Serve) -> tuple[web.Application, str]:
    return await serve()


def settings_for(**fields: Any) -> HttpSettings:
    return HttpSettings.model_validate(
        {"name": "t", "type": "http", "channel": "api", "interval": "10s", "timeout": "2s", **fields}
    )


async def probe_once(timeout: float = 2.0, scrubber: Scrubber | None = None, **fields: Any) -> Result:
    """Builds a probe from `fields`, runs it once through the runner (which owns the timeout) and closes it."""
    settings = settings_for(**fields)
    probe = HttpProbe(settings)
    try:
        return await run_once(probe, timeout, scrubber if scrubber is not None else Scrubber())
    finally:
        await probe.close()


def check_texts(result: Result) -> list[tuple[bool, str]]:
    return [(check.passed, check.text) for check in result.checks]


# --- healthy answers and status codes -----------------------------------------------------------------------------


async def test_healthy_json_passes_with_every_phase_timed(target: tuple[web.Application, str]) -> None:
    app, base = target
    result = await probe_once(url=f"{base}/ok", expect_json={"status": "healthy", "version": 3, "channels.email": "active"})

    assert result.success and result.reason == "ok", result.message
    assert result.message.startswith("HTTP 200 OK, ")
    assert check_texts(result) == [
        (True, "[STATUS] 200"),
        (True, '[JSON] status == "healthy" (got "healthy")'),
        (True, "[JSON] version == 3 (got 3)"),
        (True, '[JSON] channels.email == "active" (got "active")'),
    ]
    for phase in ("connect", "first_byte", "transfer"):
        assert result.phases.get(phase, 0.0) > 0.0, (phase, result.phases)
    assert "tls" not in result.phases  # plain HTTP has no handshake to time
    assert result.duration_seconds >= result.phases["connect"] + result.phases["first_byte"]
    assert [r["path"] for r in app[REQUESTS]] == ["/ok"]


@pytest.mark.parametrize(
    ("code", "expect_status", "success"),
    [
        (200, ["2xx"], True),
        (204, ["2xx"], True),
        (201, [200], False),
        (301, ["3xx"], True),
        (302, ["2xx"], False),
        (404, [404], True),
        (418, [200, 418], True),
        (404, [200, "2xx"], False),
        (500, ["2xx"], False),
        (503, ["2xx", "3xx", "4xx"], False),
        (503, ["5xx"], True),
    ],
)
async def test_expect_status_codes_and_classes(
    target: tuple[web.Application, str], code: int, expect_status: list[int | str], success: bool
) -> None:
    _, base = target
    result = await probe_once(url=f"{base}/status/{code}", expect_status=expect_status, follow_redirects=False)

    expected = ", ".join(str(s) for s in expect_status)
    if success:
        assert result.success and result.reason == "ok", result.message
        assert check_texts(result) == [(True, f"[STATUS] {code}")]
    else:
        assert not result.success and result.reason == "status"
        assert result.message.startswith(f"HTTP {code} ") and result.message.endswith(f"expected {expected}")
        assert check_texts(result) == [(False, f"[STATUS] {code} in ({expected})")]


async def test_server_error_fails_on_status_before_json_checks(target: tuple[web.Application, str]) -> None:
    _, base = target
    result = await probe_once(url=f"{base}/status/500", expect_json={"status": "healthy"})

    assert not result.success and result.reason == "status"
    assert result.message == "HTTP 500 Internal Server Error, expected 2xx"
    assert check_texts(result) == [(False, "[STATUS] 500 in (2xx)")]


# --- timeouts -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "phase"),
    [("/slow-headers", "first_byte"), ("/hang", "first_byte"), ("/slow-body", "transfer")],
)
async def test_slow_or_hanging_server_times_out_naming_the_phase(
    target: tuple[web.Application, str], path: str, phase: str
) -> None:
    app, base = target
    started = asyncio.get_running_loop().time()
    result = await probe_once(timeout=SHORT_TIMEOUT, url=f"{base}{path}")
    elapsed = asyncio.get_running_loop().time() - started

    assert not result.success and result.reason == "timeout"
    assert result.message == f"no answer within 300ms during {phase}"
    assert elapsed < SLOW_SECONDS  # the runner cut it short; it did not wait for the server
    assert result.phases.get("connect", 0.0) > 0.0  # the phases that did finish are kept
    assert [r["path"] for r in app[REQUESTS]] == [path]


# --- body size ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sized", "streamed"])
@pytest.mark.parametrize(("size", "success"), [(100_000, True), (100_001, False), (1_000_000, False)])
async def test_max_body_bytes_with_and_without_content_length(
    target: tuple[web.Application, str], kind: str, size: int, success: bool
) -> None:
    _, base = target
    result = await probe_once(url=f"{base}/{kind}/{size}", max_body_bytes=100_000)

    if success:
        assert result.success and result.reason == "ok", result.message
        assert result.message == f"HTTP 200 OK, {size} bytes"
    else:
        assert not result.success and result.reason == "body"
        if kind == "sized":  # refused from the header, before reading
            assert result.message == f"body of {size} bytes is larger than max_body_bytes (100000)"
        else:  # refused while reading a chunked body
            assert result.message == "body is larger than max_body_bytes (100000)"


async def test_max_body_bytes_counts_decompressed_bytes(target: tuple[web.Application, str]) -> None:
    _, base = target
    result = await probe_once(url=f"{base}/gzipped/5000000", max_body_bytes=100_000)

    assert not result.success and result.reason == "body"
    assert "larger than max_body_bytes (100000)" in result.message


async def test_head_request_is_not_judged_by_the_size_it_declares(target: tuple[web.Application, str]) -> None:
    # A HEAD answer carries the Content-Length of the GET body but no body at all: nothing is too big to read.
    _, base = target
    result = await probe_once(url=f"{base}/sized/2000000", method="HEAD", max_body_bytes=100_000)

    assert result.success and result.reason == "ok", result.message
    assert result.message == "HTTP 200 OK, 0 bytes"


# --- JSON and body checks -----------------------------------------------------------------------------------------


async def test_malformed_json_fails_the_json_checks(target: tuple[web.Application, str]) -> None:
    _, base = target
    result = await probe_once(url=f"{base}/malformed", expect_json={"status": "healthy"})

    assert not result.success and result.reason == "assertion"
    assert result.message.startswith("HTTP 200 OK but the body is not JSON: ")
    assert check_texts(result) == [(True, "[STATUS] 200")]


@pytest.mark.parametrize(
    ("document", "expect_json", "failed_check"),
    [
        ('{"status": "degraded"}', {"status": "healthy"}, '[JSON] status == "healthy" (got "degraded")'),
        ('{"status": "healthy"}', {"database": "active"}, '[JSON] database == "active" (got missing)'),
        ('{"a": {"b": [1, 7]}}', {"a.b[1]": 2}, "[JSON] a.b[1] == 2 (got 7)"),
        ('{"version": "3"}', {"version": 3}, '[JSON] version == 3 (got "3")'),
        ('{"ok": 1}', {"ok": True}, "[JSON] ok == true (got 1)"),
        ('{"count": true}', {"count": 1}, "[JSON] count == 1 (got true)"),
        ('{"ready": null}', {"ready": False}, "[JSON] ready == false (got null)"),
    ],
)
async def test_expect_json_mismatch_shows_the_resolved_value(
    target: tuple[web.Application, str], document: str, expect_json: dict[str, Any], failed_check: str
) -> None:
    _, base = target
    url = str(URL(f"{base}/doc").with_query(doc=document))
    result = await probe_once(url=url, expect_json=expect_json)

    assert not result.success and result.reason == "assertion"
    assert check_texts(result) == [(True, "[STATUS] 200"), (False, failed_check)]
    assert result.message == f"HTTP 200 OK; failed: {failed_check}"


async def test_expect_json_null_and_nested_values_pass(target: tuple[web.Application, str]) -> None:
    _, base = target
    url = str(URL(f"{base}/doc").with_query(doc='{"a": {"b": [1, 2]}, "ready": null, "ok": true}'))
    result = await probe_once(url=url, expect_json={"$.a.b[1]": 2, "ready": None, "ok": True})

    assert result.success and result.reason == "ok", result.message
    assert all(passed for passed, _ in check_texts(result))


@pytest.mark.parametrize(
    ("regex", "not_regex", "failed"),
    [
        ("Welcome", None, None),
        (None, "(?i)error|exception", None),
        ("Welcome", "(?i)error", None),
        ("Maintenance", None, "[BODY] matches /Maintenance/"),
        (None, "systems normal", "[BODY] does not match /systems normal/"),
        ("Welcome", "portal", "[BODY] does not match /portal/"),
    ],
)
async def test_body_regexes(
    target: tuple[web.Application, str], regex: str | None, not_regex: str | None, failed: str | None
) -> None:
    _, base = target
    result = await probe_once(url=f"{base}/text", expect_body_regex=regex, expect_body_not_regex=not_regex)

    body_checks = [(passed, text) for passed, text in check_texts(result) if text.startswith("[BODY]")]
    assert len(body_checks) == (regex is not None) + (not_regex is not None)
    if failed is None:
        assert result.success and result.reason == "ok", result.message
        assert all(passed for passed, _ in body_checks)
    else:
        assert not result.success and result.reason == "assertion"
        assert (False, failed) in body_checks
        assert result.message == f"HTTP 200 OK; failed: {failed}"


# --- redirects ----------------------------------------------------------------------------------------------------


async def test_redirect_on_the_same_host_is_followed(target: tuple[web.Application, str]) -> None:
    app, base = target
    result = await probe_once(url=f"{base}/chain/2", expect_json={"status": "healthy"})

    assert result.success and result.reason == "ok", result.message
    assert [r["path"] for r in app[REQUESTS]] == ["/chain/2", "/chain/1", "/chain/0"]


async def test_redirect_to_another_host_is_refused_before_any_request_goes_there(serve: Serve) -> None:
    app, base = await serve()
    other_app, other_base = await serve()
    elsewhere = str(URL(other_base).with_host("localhost") / "ok")  # same machine, but another host name
    result = await probe_once(url=str(URL(f"{base}/to").with_query(url=elsewhere)))

    assert not result.success and result.reason == "redirect"
    assert result.message == "redirected to another host (localhost); allow_redirect_to_other_host is off"
    assert [r["path"] for r in app[REQUESTS]] == ["/to"]
    assert other_app[REQUESTS] == []


async def test_redirect_to_another_host_is_followed_when_allowed(serve: Serve) -> None:
    app, base = await serve()
    other_app, other_base = await serve()
    elsewhere = str(URL(other_base).with_host("localhost") / "ok")
    result = await probe_once(
        url=str(URL(f"{base}/to").with_query(url=elsewhere)),
        allow_redirect_to_other_host=True,
        expect_json={"status": "healthy"},
    )

    assert result.success and result.reason == "ok", result.message
    assert [r["path"] for r in app[REQUESTS]] == ["/to"]
    assert [r["path"] for r in other_app[REQUESTS]] == ["/ok"]


async def test_credentials_never_follow_a_redirect_to_another_origin(serve: Serve) -> None:
    """Another port on the same host is another origin: the API key, cookie and Authorization stay behind,
    the synthetic marker goes on."""
    app, base = await serve()
    other_app, other_base = await serve()
    result = await probe_once(
        url=str(URL(f"{base}/to").with_query(url=f"{other_base}/ok")),
        headers={"Authorization": "Bearer tok-1234", "X-Api-Key": "key-5678", "Cookie": "session=abcd", "X-Team": "support"},
    )
    assert result.success, result.message
    first, = app[REQUESTS]
    assert first["headers"]["X-Api-Key"] == "key-5678" and first["headers"]["Authorization"] == "Bearer tok-1234"
    followed, = other_app[REQUESTS]
    assert {"Authorization", "X-Api-Key", "Cookie"}.isdisjoint(followed["headers"])
    assert followed["headers"]["X-Team"] == "support" and followed["headers"]["X-Synthetic-Canary"] == "1"


async def test_credentials_follow_a_redirect_on_the_same_origin(target: tuple[web.Application, str]) -> None:
    app, base = target
    result = await probe_once(url=f"{base}/chain/1", headers={"X-Api-Key": "key-5678"})
    assert result.success, result.message
    assert [r["headers"].get("X-Api-Key") for r in app[REQUESTS]] == ["key-5678", "key-5678"]


@pytest.mark.parametrize(("expect_status", "reason"), [([302], "ok"), (["3xx"], "ok"), (["2xx"], "status")])
async def test_redirect_not_followed_when_follow_redirects_is_off(
    target: tuple[web.Application, str], expect_status: list[int | str], reason: str
) -> None:
    app, base = target
    result = await probe_once(url=f"{base}/chain/1", follow_redirects=False, expect_status=expect_status)

    assert result.reason == reason, result.message
    assert result.message.startswith("HTTP 302 Found")
    assert [r["path"] for r in app[REQUESTS]] == ["/chain/1"]


@pytest.mark.parametrize(("hops", "max_redirects", "success"), [(3, 3, True), (4, 3, False), (1, 1, True), (2, 1, False)])
async def test_max_redirects(
    target: tuple[web.Application, str], hops: int, max_redirects: int, success: bool
) -> None:
    app, base = target
    result = await probe_once(url=f"{base}/chain/{hops}", max_redirects=max_redirects)

    if success:
        assert result.success and result.reason == "ok", result.message
        assert len(app[REQUESTS]) == hops + 1
    else:
        assert not result.success and result.reason == "redirect"
        assert result.message == f"more than {max_redirects} redirects"
        assert len(app[REQUESTS]) == max_redirects + 1  # the last redirect answer is not followed


async def test_endless_redirects_stop_at_the_default_limit(target: tuple[web.Application, str]) -> None:
    app, base = target
    result = await probe_once(url=f"{base}/chain/50")

    assert not result.success and result.reason == "redirect"
    assert result.message == "more than 10 redirects"
    assert len(app[REQUESTS]) == 11  # the first request and the 10 redirects it may follow


# --- TLS ----------------------------------------------------------------------------------------------------------


def _server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


@pytest.fixture
def ca(tmp_path: Path) -> tuple[trustme.CA, str]:
    authority = trustme.CA()
    pem = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(pem))
    return authority, str(pem)


def _issue(authority: trustme.CA, kind: str) -> trustme.LeafCert:
    now = datetime.now(timezone.utc)
    if kind == "expired":
        return authority.issue_cert("127.0.0.1", not_before=now - timedelta(days=10), not_after=now - timedelta(days=1))
    if kind == "other-name":
        return authority.issue_cert("api.example.test")
    return authority.issue_cert("127.0.0.1")


async def test_tls_trusted_through_ca_file_passes_and_times_the_handshake(
    serve: Serve, ca: tuple[trustme.CA, str]
) -> None:
    authority, ca_file = ca
    _, base = await serve(_server_context(_issue(authority, "valid")))
    result = await probe_once(url=f"{base}/ok", ca_file=ca_file, expect_json={"status": "healthy"})

    assert base.startswith("https://")
    assert result.success and result.reason == "ok", result.message
    for phase in ("connect", "tls", "first_byte", "transfer"):
        assert result.phases.get(phase, 0.0) > 0.0, (phase, result.phases)


async def test_fresh_connection_probes_share_one_session_and_still_time_their_own_phases(
    serve: Serve, ca: tuple[trustme.CA, str]
) -> None:
    """Twenty probes on one TLS context run at once through one shared session: each times its own TCP connect and
    handshake (the connector finds the run through a context variable), a closed probe does not close the session
    under the others, and the last one closes it."""
    authority, ca_file = ca
    app, base = await serve(_server_context(_issue(authority, "valid")))
    probes = [HttpProbe(settings_for(name=f"p{i}", url=f"{base}/ok", ca_file=ca_file)) for i in range(20)]
    results = await asyncio.gather(*(run_once(probe, 5.0, Scrubber()) for probe in probes))
    assert all(result.success for result in results), [result.message for result in results]
    sessions = {id(probe._session) for probe in probes}
    assert len(sessions) == 1
    for result in results:
        for phase in ("connect", "tls", "first_byte"):
            assert result.phases.get(phase, 0.0) > 0.0, (phase, result.phases)
    session = probes[0]._session
    for probe in probes[:-1]:
        await probe.close()
    assert session is not None and not session.closed
    again = await run_once(probes[-1], 5.0, Scrubber())
    assert again.success and again.phases.get("tls", 0.0) > 0.0, again.message
    await probes[-1].close()
    assert session.closed
    assert len(app[REQUESTS]) == 21


async def test_a_kept_alive_probe_has_a_session_of_its_own(target: tuple[web.Application, str]) -> None:
    _, base = target
    kept, fresh = (HttpProbe(settings_for(name=name, url=f"{base}/ok", fresh_connection=name == "fresh"))
                   for name in ("kept", "fresh"))
    try:
        for probe in (kept, fresh, kept):
            assert (await run_once(probe, 5.0, Scrubber())).success
        assert kept._session is not fresh._session
    finally:
        await kept.close()
        await fresh.close()


@pytest.mark.parametrize(
    ("kind", "use_ca_file", "verify_tls", "reason", "fragment"),
    [
        ("valid", False, True, "tls", "untrusted (issuer not in the trusted CAs)"),  # signed by a CA nobody trusts
        ("expired", True, True, "tls", "expired"),
        ("other-name", True, True, "tls", "mismatch"),
        ("valid", False, False, "ok", "HTTP 200 OK"),
        ("expired", True, False, "ok", "HTTP 200 OK"),
    ],
)
async def test_tls_certificate_verification(
    serve: Serve, ca: tuple[trustme.CA, str], kind: str, use_ca_file: bool, verify_tls: bool, reason: str, fragment: str
) -> None:
    authority, ca_file = ca
    app, base = await serve(_server_context(_issue(authority, kind)))
    result = await probe_once(url=f"{base}/ok", ca_file=ca_file if use_ca_file else None, verify_tls=verify_tls)

    assert result.reason == reason, result.message
    assert fragment in result.message
    if reason == "tls":
        assert result.message.startswith("certificate not accepted: ")
        assert app[REQUESTS] == []  # nothing was sent over a connection that was not trusted
    else:
        assert [r["path"] for r in app[REQUESTS]] == ["/ok"]


# --- connection failures ------------------------------------------------------------------------------------------


async def test_connection_refused() -> None:
    result = await probe_once(url=f"http://127.0.0.1:{free_port()}/health")

    assert not result.success and result.reason == "connect"
    assert result.message.startswith("cannot connect: ")


async def test_dns_failure() -> None:
    result = await probe_once(url="http://canary-test.invalid/health")

    assert not result.success and result.reason == "dns"
    assert result.message.startswith("name did not resolve: ")
    assert "canary-test.invalid" in result.message


# --- what the probe sends -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "content_type", "received"),
    [
        ({"json": {"channel": "email", "n": 2}}, "application/json", {"channel": "email", "n": 2}),
        ({"form": {"channel": "web_form", "name": "Canary"}}, "application/x-www-form-urlencoded",
         {"channel": "web_form", "name": "Canary"}),
        ({"body": "ping"}, "text/plain", "ping"),
    ],
)
async def test_post_sends_the_configured_body(
    target: tuple[web.Application, str], fields: dict[str, Any], content_type: str, received: Any
) -> None:
    app, base = target
    result = await probe_once(
        url=f"{base}/echo", method="POST", expect_json={"method": "POST", "content_type": content_type}, **fields
    )

    assert result.success and result.reason == "ok", result.message
    (request,) = app[REQUESTS]
    assert request["method"] == "POST"
    assert request["content_type"] == content_type
    assert request["received"] == received


@pytest.mark.parametrize(
    ("synthetic_header", "expected"),
    [(None, {"X-Synthetic-Canary": "1"}), ("", {}), ("X-Probe-Origin: canary-7", {"X-Probe-Origin": "canary-7"})],
)
async def test_synthetic_marker_header(
    target: tuple[web.Application, str], synthetic_header: str | None, expected: dict[str, str]
) -> None:
    app, base = target
    fields = {} if synthetic_header is None else {"synthetic_header": synthetic_header}
    result = await probe_once(url=f"{base}/echo", headers={"X-Tenant": "acme"}, **fields)

    assert result.success, result.message
    (request,) = app[REQUESTS]
    headers = request["headers"]
    markers = {name: value for name, value in headers.items() if name in ("X-Synthetic-Canary", "X-Probe-Origin")}
    assert markers == expected
    assert headers["X-Tenant"] == "acme"
    assert headers["User-Agent"].startswith("channel-canary/")


# --- channel map --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("faults", "channels", "down"),
    [
        (None, {"email": True, "whatsapp": True, "web_form": True}, None),
        ({"channels": {"whatsapp": "inactive"}}, {"email": True, "whatsapp": False, "web_form": True}, "whatsapp"),
    ],
)
async def test_channel_map_from_sandbox_health(
    sandbox: tuple[web.Application, str], faults: dict[str, Any] | None, channels: dict[str, bool], down: str | None
) -> None:
    _, base = sandbox
    if faults is not None:
        async with aiohttp.ClientSession() as client:
            async with client.post(f"{base}/_sandbox/faults", json=faults) as response:
                assert response.status == 200
    result = await probe_once(url=f"{base}/health", channel_map="channels", expect_json={"status": "healthy"})

    assert result.success and result.reason == "ok", result.message
    assert dict(result.channels) == channels
    if down is None:
        assert "down" not in result.message
    else:
        assert result.message.endswith(f"; channel {down} reported inactive")
        assert "email" not in result.message and "web_form" not in result.message


async def test_channel_map_on_malformed_json_is_an_assertion_failure(sandbox: tuple[web.Application, str]) -> None:
    _, base = sandbox
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{base}/_sandbox/faults", json={"health": "malformed"}) as response:
            assert response.status == 200
    result = await probe_once(url=f"{base}/health", channel_map="channels")

    assert not result.success and result.reason == "assertion"
    assert "not JSON" in result.message
    assert dict(result.channels) == {}


# --- connection reuse ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fresh", "connections"), [(True, 2), (False, 1)])
async def test_fresh_connection_opens_a_new_connection_each_run(
    target: tuple[web.Application, str], fresh: bool, connections: int
) -> None:
    app, base = target
    probe = HttpProbe(settings_for(url=f"{base}/ok", fresh_connection=fresh))
    try:
        first = await run_once(probe, 2.0, Scrubber())
        second = await run_once(probe, 2.0, Scrubber())
    finally:
        await probe.close()

    assert first.success and second.success, (first.message, second.message)
    transports = [r["transport"] for r in app[REQUESTS]]  # held in the list, so their ids stay distinct
    assert len(transports) == 2
    assert len({id(t) for t in transports}) == connections
    assert first.phases.get("connect", 0.0) > 0.0
    # A reused connection has nothing to connect: only a fresh one times connect again.
    assert ("connect" in second.phases) is fresh


# --- secrets ------------------------------------------------------------------------------------------------------

TOKEN = "Bearer tok-" + "a1b2c3d4e5" * 12  # long, like a JWT: longer than any shown value is cut to
PASSWORD = "pw-Secret-987"


BASIC = "Basic " + base64.b64encode(f"canary:{PASSWORD}".encode()).decode()


@pytest.mark.parametrize("mode", ["status", "json"])
@pytest.mark.parametrize(
    ("headers", "userinfo", "secret", "sent"),
    [({"Authorization": TOKEN}, "", TOKEN, TOKEN), ({}, f"canary:{PASSWORD}@", PASSWORD, BASIC)],
    ids=["authorization-header", "url-password"],
)
async def test_credentials_never_reach_the_message(
    target: tuple[web.Application, str], headers: dict[str, str], userinfo: str, secret: str, sent: str, mode: str
) -> None:
    app, base = target
    url = f"{base}/credentials?mode={mode}".replace("://", f"://{userinfo}", 1)
    settings = settings_for(url=url, headers=headers, expect_json={"who": "nobody"})
    probe = HttpProbe(settings)
    try:
        result = await run_once(probe, 2.0, Scrubber(settings.secret_values()))
    finally:
        await probe.close()

    assert not result.success and result.reason == {"status": "status", "json": "assertion"}[mode], result.message
    (request,) = app[REQUESTS]
    assert request["headers"]["Authorization"] == sent  # the credential was really sent, and the server repeats it
    assert "***" in result.message  # ... and it was masked
    for text in [result.message, *(check.text for check in result.checks)]:
        assert secret[:16] not in text and secret[-16:] not in text, text


# --- settings validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"url": "ftp://127.0.0.1/health"}, "absolute http:// or https:// URL"),
        ({"url": "/health"}, "absolute http:// or https:// URL"),
        ({"expect_body_regex": "(unclosed"}, "not a valid regular expression"),
        ({"expect_body_not_regex": "[z-a]"}, "not a valid regular expression"),
        ({"json": {"a": 1}, "form": {"a": "1"}}, "set at most one of body, json and form (got json, form)"),
        ({"body": "x", "json": {"a": 1}}, "set at most one of body, json and form (got body, json)"),
        ({"expect_status": ["2xxx"]}, "neither a status code nor a class"),
        ({"expect_status": ["6xx"]}, "neither a status code nor a class"),
        ({"expect_status": [600]}, "status 600 is not between 100 and 599"),
        ({"expect_status": [99]}, "status 99 is not between 100 and 599"),
        ({"expect_status": []}, "at least 1 item"),
        ({"expect_json": {"a..b": 1}}, "is not understood"),
        ({"synthetic_header": "X-Synthetic-Canary"}, "Header-Name: value"),
        ({"max_body_bytes": 0}, "greater than 0"),
        ({"method": "TRACE"}, "Input should be"),
        ({"timeout": "soon"}, "is not a duration"),
        ({"follow_redirect": False}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_settings_are_rejected(fields: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError) as caught:
        settings_for(**{"url": "http://127.0.0.1/health", **fields})
    assert fragment in str(caught.value)


def test_valid_settings_keep_their_values() -> None:
    settings = settings_for(
        url="https://user:hunter22@status.example.test/health?x=1",
        expect_status=["2xx", 404],
        headers={"Authorization": "Bearer abcdef", "X-Tenant": "acme"},
        json={"a": 1},
    )
    assert settings.interval == 10.0 and settings.timeout == 2.0
    assert settings.expect_status == ["2xx", 404]
    assert settings.body_json == {"a": 1}
    assert settings.target() == "GET https://status.example.test/health"
    assert sorted(settings.secret_values()) == ["Bearer abcdef", "hunter22"]
