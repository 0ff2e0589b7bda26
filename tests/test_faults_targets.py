"""The fault suite: probes against real hostile servers on 127.0.0.1 (see `tests/hostile.py`).

For every case: the probe fails within its timeout (plus a generous margin: CI is a loaded 2-core machine) with one
specific reason from `canary.contract.REASONS` and a message that explains it; where the target can stall, a healthy
neighbour probe in the same event loop keeps starting on time; where a target can send without end, memory stays
bounded. Nothing a target sends may hold the event loop.
"""

from __future__ import annotations

import asyncio
import json
import tracemalloc
import unicodedata
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from aiohttp import web

from canary.contract import REASONS, Result, format_duration, printable
from canary.runner import run_once
from canary.scrub import Scrubber
from probes.gmail import GmailProbe, GmailSettings
from probes.http import HttpProbe, HttpSettings
from probes.llm import MAX_BACKOFF_SECONDS, LlmProbe, LlmSettings
from probes.statuspage import StatuspageProbe, StatuspageSettings
from probes.tcp import TcpProbe, TcpSettings
from probes.tls import TlsProbe, TlsSettings
from probes.transaction import TransactionProbe, TransactionSettings
from tests.hostile import (
    Certificates, LlmBehaviour, Neighbour, Servers, banner, certificates, endless_chunked, healthy_app, llm_app, lying_length,
    never_answer, raw_answer, trickle,
)

TIMEOUT = 1.5  # the hostile probe's timeout
MARGIN = 2.0  # how much later than its timeout a failing run may end, on a loaded machine


# --- fixtures and helpers -----------------------------------------------------------------------------------------


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    started = Servers()
    try:
        yield started
    finally:
        await started.close()


@pytest.fixture
async def healthy(servers: Servers) -> str:
    """A healthy server for the neighbour probe."""
    return await servers.app(healthy_app())


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return certificates(tmp_path)


def http_probe(url: str, **fields: Any) -> HttpProbe:
    return HttpProbe(HttpSettings.model_validate({
        "name": "hostile", "type": "http", "channel": "api", "interval": "10s", "timeout": f"{TIMEOUT}s",
        "url": url, **fields,
    }))


async def run(probe: Any, timeout: float = TIMEOUT) -> tuple[Result, float]:
    """One run through the runner (which owns the timeout); the result and how long it took. Closes the probe."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        result = await run_once(probe, timeout, Scrubber())
    finally:
        await probe.close()
    elapsed = loop.time() - started
    assert result.reason in REASONS
    assert elapsed < timeout + MARGIN, f"the run took {elapsed:.2f}s, timeout {timeout}s"
    return result, elapsed


async def run_beside_neighbour(probe: Any, healthy: str, timeout: float = TIMEOUT) -> tuple[Result, Neighbour]:
    """Runs the hostile probe while a healthy neighbour runs every 0.5 s; the neighbour must stay on time."""
    async with Neighbour(healthy) as neighbour:
        result, elapsed = await run(probe, timeout)
        if elapsed < 1.0:  # a quick failure: let the neighbour show a second run all the same
            await asyncio.sleep(1.0 - elapsed)
    neighbour.assert_on_time()
    return result, neighbour


# --- http: a target that never answers --------------------------------------------------------------------------------


async def test_http_target_that_accepts_and_never_answers_times_out_naming_first_byte(
    servers: Servers, healthy: str
) -> None:
    server = await servers.raw(never_answer())
    result, _ = await run_beside_neighbour(http_probe(f"{server.url}/health"), healthy)

    assert (result.success, result.reason) == (False, "timeout")
    assert result.message == "no answer within 1.5s during first_byte"
    assert result.phases.get("connect", 0.0) > 0.0  # the connect did finish: it is the answer that never came
    assert len(server.requests) == 1 and server.requests[0].startswith(b"GET /health HTTP/1.1")


# --- http: a body without end --------------------------------------------------------------------------------------


async def test_http_endless_chunked_body_fails_body_at_once_with_memory_bounded(servers: Servers, healthy: str) -> None:
    limit = 1_048_576
    server = await servers.raw(endless_chunked())
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        async with Neighbour(healthy) as neighbour:
            result, elapsed = await run(http_probe(f"{server.url}/big", max_body_bytes=limit), timeout=10.0)
            await asyncio.sleep(max(1.0 - elapsed, 0.0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert (result.success, result.reason) == (False, "body")
    assert result.message == f"body is larger than max_body_bytes ({limit})"
    assert elapsed < 5.0  # refused while reading, long before the 10 s timeout (with tracemalloc slowing every step)
    assert peak - before < 4 * limit, f"memory grew by {(peak - before) / 1e6:.1f} MB while reading"
    assert limit < server.sent_bytes < 64 * limit  # the server was cut off, not read to its end
    neighbour.assert_on_time()


async def test_http_body_that_trickles_without_end_times_out_in_transfer(servers: Servers, healthy: str) -> None:
    server = await servers.raw(trickle())
    result, _ = await run_beside_neighbour(http_probe(f"{server.url}/health"), healthy)

    assert (result.success, result.reason) == (False, "timeout")
    assert result.message == "no answer within 1.5s during transfer"
    assert server.sent_bytes > 100  # it did keep sending, a byte at a time


# --- http: Content-Length that lies ---------------------------------------------------------------------------------


async def test_http_content_length_longer_than_the_body_then_close_fails_body(servers: Servers) -> None:
    server = await servers.raw(lying_length(1000, b'{"status": "healthy"}', then="close"))
    result, elapsed = await run(http_probe(f"{server.url}/health"))

    assert (result.success, result.reason) == (False, "body")
    assert result.message.startswith("body could not be read: ")
    assert "content length" in result.message.lower()
    assert elapsed < TIMEOUT  # the close ends it, not the timeout


async def test_http_content_length_longer_than_the_body_held_open_times_out_in_transfer(
    servers: Servers, healthy: str
) -> None:
    server = await servers.raw(lying_length(1000, b'{"status": "healthy"}', then="hold"))
    result, _ = await run_beside_neighbour(http_probe(f"{server.url}/health"), healthy)

    assert (result.success, result.reason) == (False, "timeout")
    assert result.message == "no answer within 1.5s during transfer"


async def test_http_content_length_shorter_than_the_body_is_a_malformed_answer(servers: Servers) -> None:
    # HTTP/1.1 ends an answer after Content-Length bytes (RFC 9112 6.3): here `{"status":`. The bytes that follow
    # in the same segment are read as the start of the next answer, and they are not one, so aiohttp refuses the
    # stream: the probe reports a malformed answer (reason `status`: no valid answer, so no expected status), at
    # once. The JSON check never sees the cut document.
    server = await servers.raw(lying_length(10, b'{"status": "healthy"}', then="hold"))
    result, elapsed = await run(http_probe(f"{server.url}/health", expect_json={"status": "healthy"}))

    assert (result.success, result.reason) == (False, "status"), result.message
    assert result.message.startswith("malformed answer: ") and "Bad status line" in result.message
    assert elapsed < TIMEOUT


@pytest.mark.parametrize("fresh_connection", [True, False])
async def test_http_content_length_shorter_than_the_body_never_lets_the_rest_pass_for_the_next_answer(
    servers: Servers, fresh_connection: bool
) -> None:
    # When what follows the declared bytes parses as an answer of its own (response splitting), the probe judges
    # the answer it asked for, exactly as declared, as Go's net/http (blackbox_exporter) and curl do. The rest is
    # never taken for the next run's answer: aiohttp closes a connection with bytes left over, even a kept-alive one.
    document = b'{"status": "healthy"}'
    server = await servers.raw(lying_length(len(document), document + b"HTTP/1.1 200 OK\r\n\r\nsmuggled", then="hold"))
    probe = http_probe(f"{server.url}/health", expect_json={"status": "healthy"}, fresh_connection=fresh_connection)
    try:
        first = await run_once(probe, TIMEOUT, Scrubber())
        second = await run_once(probe, TIMEOUT, Scrubber())
    finally:
        await probe.close()

    for result in (first, second):
        assert result.success, result.message
        assert result.message == f"HTTP 200 OK, {len(document)} bytes"
    assert server.connections == 2  # each run had a connection of its own


# --- http: redirects and statuses ----------------------------------------------------------------------------------


def redirect_app() -> web.Application:
    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def hops(request: web.Request) -> web.Response:
        left = int(request.match_info["n"])
        if left == 0:
            return web.json_response({"status": "healthy"})
        raise web.HTTPFound(f"/hops/{left - 1}")

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="no")

    app = web.Application()
    app.router.add_get("/loop", loop)
    app.router.add_get("/hops/{n}", hops)
    app.router.add_get("/status/{code}", status)
    return app


async def test_http_redirect_loop_fails_redirect(servers: Servers) -> None:
    base = await servers.app(redirect_app())
    result, _ = await run(http_probe(f"{base}/loop"))

    assert (result.success, result.reason) == (False, "redirect")
    assert result.message == "more than 10 redirects"


@pytest.mark.parametrize(("hops", "reason"), [(10, "ok"), (11, "redirect")])
async def test_http_default_max_redirects_allows_ten_and_refuses_eleven(servers: Servers, hops: int, reason: str) -> None:
    base = await servers.app(redirect_app())
    result, _ = await run(http_probe(f"{base}/hops/{hops}", expect_json={"status": "healthy"}))

    assert result.reason == reason, result.message
    if reason == "redirect":
        assert result.message == "more than 10 redirects"


@pytest.mark.parametrize(("code", "phrase"), [(503, "Service Unavailable"), (404, "Not Found")])
async def test_http_error_status_fails_status_naming_the_code(servers: Servers, code: int, phrase: str) -> None:
    base = await servers.app(redirect_app())
    result, _ = await run(http_probe(f"{base}/status/{code}"))

    assert (result.success, result.reason) == (False, "status")
    assert result.message == f"HTTP {code} {phrase}, expected 2xx"


# --- TLS: expired, self-signed, another host --------------------------------------------------------------------------

# (served certificate, whether the probe trusts the private CA, what the message must say)
TLS_CASES = [
    ("expired", True, "expired"),
    ("self-signed", True, "self-signed"),
    ("self-signed", False, "self-signed"),
    ("other-host", True, "issued for another IP address"),
]


@pytest.mark.parametrize(("kind", "trust_ca", "said"), TLS_CASES)
async def test_tls_probe_refuses_a_bad_certificate_saying_which(
    servers: Servers, certs: Certificates, kind: str, trust_ca: bool, said: str
) -> None:
    base = await servers.app(healthy_app(), ssl_context=certs.context(kind))
    port = int(base.rsplit(":", 1)[1])
    probe = TlsProbe(TlsSettings.model_validate({
        "name": "hostile-tls", "type": "tls", "channel": "api", "interval": "10s", "timeout": f"{TIMEOUT}s",
        "host": "127.0.0.1", "port": port, **({"ca_file": certs.ca_file} if trust_ca else {}),
    }))
    result, _ = await run(probe)

    assert (result.success, result.reason) == (False, "tls"), result.message
    assert result.message.startswith(f"certificate of 127.0.0.1:{port} not accepted: {said}")


async def test_tls_probe_refuses_a_certificate_for_another_host_name(servers: Servers, certs: Certificates) -> None:
    base = await servers.app(healthy_app(), ssl_context=certs.context("other-host"))
    port = int(base.rsplit(":", 1)[1])
    probe = TlsProbe(TlsSettings.model_validate({
        "name": "hostile-tls", "type": "tls", "channel": "api", "interval": "10s", "timeout": f"{TIMEOUT}s",
        "host": "127.0.0.1", "port": port, "server_name": "api.canary.test", "ca_file": certs.ca_file,
    }))
    result, _ = await run(probe)

    assert (result.success, result.reason) == (False, "tls"), result.message
    assert result.message.startswith(f"certificate of 127.0.0.1:{port} not accepted: issued for another host name")


@pytest.mark.parametrize(("kind", "trust_ca", "said"), TLS_CASES)
async def test_http_probe_refuses_a_bad_certificate_saying_which(
    servers: Servers, certs: Certificates, kind: str, trust_ca: bool, said: str
) -> None:
    base = await servers.app(healthy_app(), ssl_context=certs.context(kind))
    probe = http_probe(f"{base}/ok", **({"ca_file": certs.ca_file} if trust_ca else {}))
    result, _ = await run(probe)

    assert (result.success, result.reason) == (False, "tls"), result.message
    assert result.message.startswith(f"certificate not accepted: {said}")


async def test_both_tls_probes_pass_a_good_certificate_from_the_private_ca(servers: Servers, certs: Certificates) -> None:
    # The control: the same servers and CA, with a certificate that is fine.
    base = await servers.app(healthy_app(), ssl_context=certs.context("valid"))
    port = int(base.rsplit(":", 1)[1])
    tls, _ = await run(TlsProbe(TlsSettings.model_validate({
        "name": "good-tls", "type": "tls", "channel": "api", "interval": "10s", "timeout": f"{TIMEOUT}s",
        "host": "127.0.0.1", "port": port, "ca_file": certs.ca_file, "min_days_remaining": 1,
    })))
    http, _ = await run(http_probe(f"{base}/ok", ca_file=certs.ca_file, expect_json={"status": "healthy"}))

    assert tls.success, tls.message
    assert http.success, http.message


# --- llm: 429 and Retry-After, bad answers, endless streams, rate-limit reset headers -----------------------------------


def llm_probe(base: str) -> LlmProbe:
    return LlmProbe(LlmSettings.model_validate({
        "name": "hostile-llm", "type": "llm", "channel": "ai", "interval": "1m", "base_url": f"{base}/v1",
        "api_key": "sk-canary-test-key", "model": "canary-model", "slow_after": "1s", "timeout": f"{TIMEOUT}s",
    }))


@pytest.fixture
async def provider(servers: Servers) -> tuple[LlmBehaviour, str]:
    behaviour = LlmBehaviour()
    return behaviour, await servers.app(llm_app(behaviour))


def figures(result: Result) -> dict[tuple[str, str], float]:
    return {(g.name, dict(g.labels).get("kind", "")): g.value for g in result.gauges}


async def test_llm_429_retry_after_seconds_sends_nothing_until_the_window_passes(
    provider: tuple[LlmBehaviour, str]
) -> None:
    behaviour, base = provider
    behaviour.limited, behaviour.retry_after = 1, "1"
    probe = llm_probe(base)
    try:
        limited = await run_once(probe, TIMEOUT, Scrubber())
        waiting = await run_once(probe, TIMEOUT, Scrubber())
        sent_while_waiting = len(behaviour.requests)
        await asyncio.sleep(1.2)
        after = await run_once(probe, TIMEOUT, Scrubber())
    finally:
        await probe.close()

    assert (limited.reason, waiting.reason) == ("rate_limited", "rate_limited")
    assert "HTTP 429 on GET /models (rate_limit_exceeded, Rate limit reached)" in limited.message
    assert "(retry-after 1s)" in limited.message
    assert waiting.message.endswith("no request sent") and waiting.duration_seconds < 1.0  # failed fast (no request: counted above)
    assert 0 < figures(waiting)[("llm_backoff_seconds", "")] <= 1
    assert sent_while_waiting == 1  # the 429'd call, and nothing during the window
    assert after.success, after.message
    assert behaviour.requests == ["GET /v1/models", "GET /v1/models", "POST /v1/chat/completions"]


async def test_llm_429_retry_after_http_date_is_honoured(provider: tuple[LlmBehaviour, str]) -> None:
    behaviour, base = provider
    behaviour.limited = 1
    behaviour.retry_after = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=3), usegmt=True)
    probe = llm_probe(base)
    try:
        limited = await run_once(probe, TIMEOUT, Scrubber())
        waiting = await run_once(probe, TIMEOUT, Scrubber())
        backoff = figures(waiting)[("llm_backoff_seconds", "")]
        sent_while_waiting = len(behaviour.requests)
        await asyncio.sleep(backoff + 0.2)
        after = await run_once(probe, TIMEOUT, Scrubber())
    finally:
        await probe.close()

    assert (limited.reason, waiting.reason) == ("rate_limited", "rate_limited")
    assert "not calling again before " in limited.message
    assert 1.0 < backoff <= 3.0  # the date has whole seconds: 2-3 s from the 429
    assert waiting.message.endswith("no request sent")
    assert sent_while_waiting == 1
    assert after.success, after.message


async def test_llm_429_with_garbage_retry_after_does_not_back_off(provider: tuple[LlmBehaviour, str]) -> None:
    behaviour, base = provider
    behaviour.limited, behaviour.retry_after = 1, "after lunch, maybe"
    probe = llm_probe(base)
    try:
        limited = await run_once(probe, TIMEOUT, Scrubber())
        after = await run_once(probe, TIMEOUT, Scrubber())
    finally:
        await probe.close()

    assert limited.reason == "rate_limited"
    assert limited.message.endswith(
        "; retry-after 'after lunch, maybe' is neither seconds nor an HTTP date, so the next run calls again")
    assert figures(limited)[("llm_backoff_seconds", "")] == 0
    assert after.success, after.message  # called again at once, and the provider answered
    assert behaviour.requests[:2] == ["GET /v1/models", "GET /v1/models"]


async def test_llm_429_retry_after_a_day_is_capped_at_an_hour(provider: tuple[LlmBehaviour, str]) -> None:
    behaviour, base = provider
    behaviour.limited, behaviour.retry_after = 1, "86400"
    probe = llm_probe(base)
    try:
        limited = await run_once(probe, TIMEOUT, Scrubber())
        waiting = await run_once(probe, TIMEOUT, Scrubber())
    finally:
        await probe.close()

    assert (limited.reason, waiting.reason) == ("rate_limited", "rate_limited")
    assert f"(retry-after {format_duration(MAX_BACKOFF_SECONDS)})" in limited.message
    assert MAX_BACKOFF_SECONDS - 5 < figures(waiting)[("llm_backoff_seconds", "")] <= MAX_BACKOFF_SECONDS
    assert waiting.message.endswith("no request sent")
    assert behaviour.requests == ["GET /v1/models"]


@pytest.mark.parametrize("mode", ["invalid-json", "empty-choices"])
async def test_llm_answer_that_is_not_a_chat_completion_fails_assertion(
    provider: tuple[LlmBehaviour, str], mode: str
) -> None:
    behaviour, base = provider
    behaviour.completion = mode
    result, _ = await run(llm_probe(base))

    assert (result.success, result.reason) == (False, "assertion")
    assert result.message == "POST /chat/completions answered 200 but not with a chat completion (no choices)"


async def test_llm_stream_that_never_ends_times_out_in_completion(provider: tuple[LlmBehaviour, str], healthy: str) -> None:
    behaviour, base = provider
    behaviour.completion = "trickle"
    result, _ = await run_beside_neighbour(llm_probe(base), healthy)

    assert (result.success, result.reason) == (False, "timeout")
    assert result.message == "no answer within 1.5s during completion"


async def test_llm_stream_that_floods_is_cut_at_the_body_limit(provider: tuple[LlmBehaviour, str], healthy: str) -> None:
    behaviour, base = provider
    behaviour.completion = "flood"
    result, _ = await run_beside_neighbour(llm_probe(base), healthy, timeout=5.0)

    assert (result.success, result.reason) == (False, "body")
    assert result.message == "POST /chat/completions: body is larger than max_body_bytes (2097152)"


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("2m59.56s", 179.56), ("6m0s", 360.0), ("12ms", 0.012), ("-1", None), (None, None)],
)
async def test_llm_rate_limit_reset_headers_become_a_gauge_only_when_they_make_sense(
    provider: tuple[LlmBehaviour, str], header: str | None, seconds: float | None
) -> None:
    # "-1" is no time at all: a negative reset is nonsense, so no gauge rather than a made-up 0.
    behaviour, base = provider
    behaviour.completion_headers = {
        f"x-ratelimit-{name}-{kind}": value
        for kind in ("requests", "tokens")
        for name, value in (("limit", "1000"), ("remaining", "900"), ("reset", header))
        if value is not None
    }
    result, _ = await run(llm_probe(base))

    assert result.success, result.message
    found = figures(result)
    for kind in ("requests", "tokens"):
        assert found[("llm_ratelimit_remaining", kind)] == 900  # the other figures are there either way
        if seconds is None:
            assert ("llm_ratelimit_reset_seconds", kind) not in found
        else:
            assert found[("llm_ratelimit_reset_seconds", kind)] == pytest.approx(seconds)


# --- gmail: a token endpoint that fails or never answers -----------------------------------------------------------------


def gmail_probe(tmp_path: Path, token_url: str, timeout: float) -> GmailProbe:
    credentials = tmp_path / "authorized-user.json"
    credentials.write_text(json.dumps({
        "type": "authorized_user", "client_id": "canary-client", "client_secret": "canary-client-secret",
        "refresh_token": "canary-refresh-token", "token_uri": token_url,
    }))
    return GmailProbe(GmailSettings.model_validate({
        "name": "hostile-gmail", "type": "gmail", "channel": "email", "interval": "5m", "timeout": f"{timeout}s",
        "credentials_file": str(credentials), "gmail_api_url": "http://127.0.0.1:9", "renew": False,
    }))


def token_app(calls: list[str]) -> web.Application:
    async def token(request: web.Request) -> web.Response:
        calls.append(request.method)
        return web.Response(status=500, text="Internal Server Error")

    app = web.Application()
    app.router.add_post("/token", token)
    return app


async def test_gmail_token_endpoint_500_fails_status_while_the_loop_stays_free(
    servers: Servers, healthy: str, tmp_path: Path
) -> None:
    calls: list[str] = []
    base = await servers.app(token_app(calls))
    # google-auth retries a 500 twice, sleeping ~1 s and ~2 s in the worker thread: the timeout leaves room for that.
    result, neighbour = await run_beside_neighbour(gmail_probe(tmp_path, f"{base}/token", 6.0), healthy, timeout=6.0)

    assert (result.success, result.reason) == (False, "status"), result.message
    assert result.message == (f"the token endpoint {base}/token failed with a server-side error (HTTP 500: Internal Server "
                              "Error), also after google-auth's retries")
    assert calls == ["POST"] * 3
    assert len(neighbour.results) >= 5  # it kept running all through the retries


async def test_gmail_token_endpoint_that_never_answers_times_out_in_token_while_the_loop_stays_free(
    servers: Servers, healthy: str, tmp_path: Path
) -> None:
    server = await servers.raw(never_answer())
    result, _ = await run_beside_neighbour(gmail_probe(tmp_path, f"{server.url}/token", TIMEOUT), healthy)

    assert (result.success, result.reason) == (False, "timeout")
    assert result.message == "no answer within 1.5s during token"
    assert len(server.requests) == 1 and server.requests[0].startswith(b"POST /token HTTP/1.1")


# --- a configured regular expression against what a target sent ---------------------------------------------------------

# `(a+)+$` on many "a" and one "b" backtracks for longer than anyone waits. With Python's `re` the search can be
# neither stopped nor moved off the loop (it keeps the GIL), so every probe stalled with it.
RUNAWAY = "(a+)+$"
RUNAWAY_TEXT = "a" * 100_000 + "b"


def text_app(text: str) -> web.Application:
    async def body(request: web.Request) -> web.Response:
        return web.Response(text=text)

    async def document(request: web.Request) -> web.Response:
        return web.json_response({"value": text})

    app = web.Application()
    app.router.add_get("/body", body)
    app.router.add_get("/doc", document)
    return app


@pytest.mark.parametrize("key", ["expect_body_regex", "expect_body_not_regex"])
async def test_http_body_regex_that_backtracks_without_end_gives_up_and_the_loop_stays_free(
    servers: Servers, healthy: str, key: str
) -> None:
    base = await servers.app(text_app(RUNAWAY_TEXT))
    result, _ = await run_beside_neighbour(http_probe(f"{base}/body", **{key: RUNAWAY}), healthy)

    assert (result.success, result.reason) == (False, "assertion"), result.message
    verb = "matches" if key == "expect_body_regex" else "does not match"
    (check,) = [c for c in result.checks if c.text.startswith("[BODY]")]
    assert not check.passed
    assert check.text.startswith(f"[BODY] {verb} /{RUNAWAY}/ (gave up after ")
    assert check.text.endswith(f"the pattern backtracks too much on this {len(RUNAWAY_TEXT)}-character body)")
    assert result.message == f"HTTP 200 OK; failed: {check.text}"


async def test_tcp_expect_that_backtracks_without_end_gives_up_and_the_loop_stays_free(
    servers: Servers, healthy: str
) -> None:
    server = await servers.raw(banner(RUNAWAY_TEXT.encode()))
    probe = TcpProbe(TcpSettings.model_validate({
        "name": "hostile-tcp", "type": "tcp", "channel": "api", "interval": "10s", "timeout": f"{TIMEOUT}s",
        "host": "127.0.0.1", "port": server.port, "expect": "(a+)+c", "max_read_bytes": 200_000,
    }))
    result, _ = await run_beside_neighbour(probe, healthy)

    assert (result.success, result.reason) == (False, "assertion"), result.message
    assert result.message.startswith("reply does not match /(a+)+c/ (the search gave up after ")
    assert "the pattern backtracks too much on these " in result.message


async def test_transaction_matches_condition_that_backtracks_without_end_gives_up_and_the_loop_stays_free(
    servers: Servers, healthy: str
) -> None:
    base = await servers.app(text_app(RUNAWAY_TEXT))
    probe = TransactionProbe(TransactionSettings.model_validate({
        "name": "hostile-transaction", "type": "transaction", "channel": "web_form", "interval": "10s",
        "timeout": f"{TIMEOUT}s", "base_url": base,
        "steps": [{"name": "read", "url": "/doc", "expect": [f'value matches "{RUNAWAY}"']}],
    }))
    result, _ = await run_beside_neighbour(probe, healthy)

    assert (result.success, result.reason) == (False, "assertion"), result.message
    assert result.message == (f'step read: [read] value matches "{RUNAWAY}" (gave up after 50ms: the pattern backtracks too '
                              f"much on this {len(RUNAWAY_TEXT)}-character value)")


# --- control characters from a target never reach a terminal, a log or a page as they are ---------------------------------

ANSI_RED, ANSI_CLEAR_SCREEN = "\x1b[31m", "\x1b[2J"


def assert_printable(text: str) -> None:
    """No control character, line separator, bidirectional override or lone surrogate left."""
    unsafe = [char for char in text
              if unicodedata.category(char) in ("Cc", "Cs") or char in "\u2028\u2029\u202a\u202b\u202c\u202d\u202e"]
    assert not unsafe, (unsafe, text)


async def test_control_characters_in_an_http_status_reason_are_escaped(servers: Servers) -> None:
    reason = f"Down{ANSI_RED} red\x00 \u202eevil\x85"
    server = await servers.raw(raw_answer(
        b"HTTP/1.1 503 " + reason.encode("utf-8").replace(b"\xc2\x85", b"\x85") + b"\r\nContent-Length: 0\r\n\r\n"))
    result, _ = await run(http_probe(f"{server.url}/health"))

    assert (result.success, result.reason) == (False, "status")
    assert result.message == "HTTP 503 Down\\x1b[31m red\\x00 \\u202eevil\\udc85, expected 2xx"
    assert_printable(result.message)
    for check in result.checks:
        assert_printable(check.text)


async def test_a_malformed_answer_quoted_by_the_http_client_stays_on_one_line(servers: Servers) -> None:
    server = await servers.raw(raw_answer(b"HTTP/1.1 200 OK\r\nX-\x1b[31m: y\r\nContent-Length: 0\r\n\r\n"))
    result, _ = await run(http_probe(f"{server.url}/health"))

    assert (result.success, result.reason) == (False, "status")
    assert result.message.startswith("malformed answer: ")
    assert "\\n" in result.message  # aiohttp's multi-line explanation, quoted as one line
    assert_printable(result.message)


async def test_control_characters_in_a_tcp_reply_are_escaped(servers: Servers) -> None:
    greeting = f"220 ready{ANSI_CLEAR_SCREEN}\x00\r\nFAKE: log line\x07".encode()
    server = await servers.raw(banner(greeting))
    probe = TcpProbe(TcpSettings.model_validate({
        "name": "hostile-tcp", "type": "tcp", "channel": "api", "interval": "10s", "timeout": f"{TIMEOUT}s",
        "host": "127.0.0.1", "port": server.port, "expect": "^SSH-", "max_read_bytes": len(greeting),
    }))
    result, _ = await run(probe)

    assert (result.success, result.reason) == (False, "assertion")
    assert "220 ready\\x1b[2J\\x00\\r\\nFAKE: log line\\x07" in result.message
    assert_printable(result.message)


async def test_control_characters_in_an_llm_provider_error_are_escaped(provider: tuple[LlmBehaviour, str]) -> None:
    behaviour, base = provider
    behaviour.completion = "error-text"
    behaviour.error_text = f"overloaded{ANSI_CLEAR_SCREEN}\x00\r\n2026-11-23 INFO canary: all good\u202e"
    result, _ = await run(llm_probe(base))

    assert (result.success, result.reason) == (False, "status")
    assert result.message == ("HTTP 500 on POST /chat/completions, expected 200 (server_error, overloaded\\x1b[2J\\x00 "
                              "2026-11-23 INFO canary: all good\\u202e)")
    assert_printable(result.message)


async def test_control_characters_in_a_statuspage_description_are_escaped(servers: Servers) -> None:
    async def status(request: web.Request) -> web.Response:
        return web.json_response({"status": {"indicator": "major", "description": f"Major outage{ANSI_RED}\x00\x1b]0;pwned\x07"}})

    app = web.Application()
    app.router.add_get("/api/v2/status.json", status)
    base = await servers.app(app)
    probe = StatuspageProbe(StatuspageSettings.model_validate({
        "name": "hostile-statuspage", "type": "statuspage", "channel": "ai", "interval": "1m", "timeout": f"{TIMEOUT}s",
        "url": base,
    }))
    result, _ = await run(probe)

    assert (result.success, result.reason) == (False, "assertion")
    assert result.message == ("the provider reports major: Major outage\\x1b[31m\\x00\\x1b]0;pwned\\x07 "
                              "(fails at major or worse)")
    assert_printable(result.message)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain text, café, 3 µs, no\u00a0break", "plain text, café, 3 µs, no\u00a0break"),
        ("a\r\nINFO forged line", "a\\r\\nINFO forged line"),
        ("\x1b[31mred\x1b[0m\x00\x07\x7f\x9b", "\\x1b[31mred\\x1b[0m\\x00\\x07\\x7f\\x9b"),
        ("abc\u202edcba\u2066x\u2028y\udc85", "abc\\u202edcba\\u2066x\\u2028y\\udc85"),
    ],
)
def test_printable_escapes_what_could_steer_a_terminal_and_keeps_the_rest(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert_printable(printable(text))
    shown.encode("utf-8")  # no lone surrogate left for a UTF-8 writer to choke on
