"""`http` probe: one HTTP request, judged on status, JSON fields and body regexes, timed phase by phase.

Each run opens a fresh connection by default (the session's connector closes it after the answer), so DNS,
connect and TLS times are real every time. Phases come from aiohttp's tracing, plus one hook in the
connector that marks when TCP is up, so TLS is timed apart from connect.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import weakref
from contextvars import ContextVar
from time import perf_counter
from types import SimpleNamespace
from typing import Any, Literal

import aiohttp
from pydantic import Field, field_validator, model_validator
from yarl import URL

from canary.contract import (
    USER_AGENT, Check, PhaseTimer, Probe, ProbeSettings, Regex, Result, Scrubber, SyntheticHeader, format_duration,
    marker_headers,
)
from probes.jsonpath import is_missing, lookup, parse_path
from probes.patterns import RegexTimeout, compile_regex, search
from probes.transport import (
    CaFile, ExpectedStatuses, HttpUrl, RedirectRefused, client_error_result, client_tls_context, read_limited,
    request_following_redirects, secret_headers, status_matches, transient_wait,
)

JsonScalar = str | int | float | bool | None
_CHANNEL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_MAX_CHANNELS = 32
_MAX_STATE_SHOWN = 40  # characters of a down channel's state shown in the message
_DEFAULT_TIMEOUT = 10.0  # settings built outside a config file carry no timeout
_CHECK_MARGIN = 0.25  # a body regex gives up this long before the run's timeout, so its own failure is reported


class HttpSettings(ProbeSettings):
    type: Literal["http"] = "http"
    url: HttpUrl
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = None
    body_json: Any = Field(default=None, alias="json")
    form: dict[str, str] | None = None
    expect_status: ExpectedStatuses = Field(default_factory=lambda: ["2xx"])
    expect_json: dict[str, JsonScalar] = Field(default_factory=dict)
    expect_body_regex: Regex | None = None
    expect_body_not_regex: Regex | None = None
    max_body_bytes: int = Field(default=1_048_576, gt=0)
    follow_redirects: bool = True
    max_redirects: int = Field(default=10, ge=1, le=50)
    allow_redirect_to_other_host: bool = False
    verify_tls: bool = True
    ca_file: CaFile | None = None
    fresh_connection: bool = True
    synthetic_header: SyntheticHeader = "X-Synthetic-Canary: 1"
    channel_map: str | None = None
    channel_up_values: list[str] = Field(default_factory=lambda: ["active", "healthy", "up", "ok", "true"])

    @field_validator("expect_json")
    @classmethod
    def _valid_paths(cls, checks: dict[str, JsonScalar]) -> dict[str, JsonScalar]:
        for path in checks:
            parse_path(path)
        return checks

    @field_validator("channel_map")
    @classmethod
    def _valid_channel_map(cls, path: str | None) -> str | None:
        if path is not None:
            parse_path(path)
        return path

    @model_validator(mode="after")
    def _one_body(self) -> "HttpSettings":
        given = [key for key, value in (("body", self.body), ("json", self.body_json), ("form", self.form)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"set at most one of body, json and form (got {', '.join(given)})")
        return self

    def target(self) -> str:
        return f"{self.method} {self.url.for_humans()}"  # type: ignore[attr-defined]

    def secret_values(self) -> list[str]:
        # Credentials in headers (Authorization, API keys, cookies) are secrets too.
        return super().secret_values() + secret_headers(self.headers)





class _PhaseRecorder(SimpleNamespace):
    """Per-run trace state, handed to aiohttp's trace callbacks as the request's trace context."""

    timer: PhaseTimer
    connect_started: float
    dns_seconds: float
    tcp_connected: float
    tls_requested: bool


# The run a connection is being made for. Connections are made in the probe's own task (or in tasks copied from
# it), so one connector serves every probe and still marks the moment TCP is up in the right run's recorder.
_RECORDER: ContextVar[_PhaseRecorder | None] = ContextVar("http_probe_recorder", default=None)


class _TimedConnector(aiohttp.TCPConnector):
    """Marks the moment TCP is up: asyncio builds the protocol right after the socket connects, before TLS."""

    async def _wrap_create_connection(self, protocol_factory: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        recorder = _RECORDER.get()
        if recorder is not None:
            recorder.tls_requested = bool(kwargs.get("ssl"))

        def timed_factory() -> Any:
            if recorder is not None:
                recorder.tcp_connected = perf_counter()
            return protocol_factory()

        return await super()._wrap_create_connection(timed_factory, *args, **kwargs)


def _new_session(ssl_context: ssl.SSLContext, fresh: bool) -> aiohttp.ClientSession:
    connector = _TimedConnector(
        force_close=fresh, use_dns_cache=not fresh, limit=0 if fresh else 1, ssl=ssl_context,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        trace_configs=[_trace_config()],
        timeout=aiohttp.ClientTimeout(total=None),  # the runner owns the timeout
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=True,
    )


class _SharedSessions:
    """One session per TLS context (and event loop) for every fresh-connection probe.

    A fresh-connection probe keeps nothing between runs (its connection closes after each answer, no cookies), so
    10,000 of them need not hold 10,000 sessions and connectors (~6 KB each), nor build one on their first run
    while other probes are due. A session lives while a probe uses it and closes with the last one."""

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, tuple[aiohttp.ClientSession, int]]] = (
            weakref.WeakKeyDictionary()
        )

    def acquire(self, ssl_context: ssl.SSLContext) -> aiohttp.ClientSession:
        sessions = self._by_loop.setdefault(asyncio.get_running_loop(), {})
        session, users = sessions.get(id(ssl_context), (None, 0))
        if session is None or session.closed:
            session = _new_session(ssl_context, fresh=True)
        sessions[id(ssl_context)] = (session, users + 1)
        return session

    async def release(self, ssl_context: ssl.SSLContext) -> None:
        sessions = self._by_loop.get(asyncio.get_running_loop(), {})
        session, users = sessions.get(id(ssl_context), (None, 0))
        if session is None:
            return
        if users > 1:
            sessions[id(ssl_context)] = (session, users - 1)
            return
        del sessions[id(ssl_context)]
        await session.close()


_SHARED = _SharedSessions()
_TRACE: aiohttp.TraceConfig | None = None


def _trace_config() -> aiohttp.TraceConfig:
    """One trace config for every session: its callbacks keep their state in the run's recorder, not here."""
    global _TRACE
    if _TRACE is None:
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_start.append(_on_connect_start)
        trace.on_dns_resolvehost_start.append(_on_dns_start)
        trace.on_dns_resolvehost_end.append(_on_dns_end)
        trace.on_connection_create_end.append(_on_connect_end)
        trace.on_connection_reuseconn.append(_on_reuse)
        trace.on_request_end.append(_on_headers_received)
        trace.freeze()
        _TRACE = trace
    return _TRACE


class HttpProbe(Probe[HttpSettings]):
    settings_model = HttpSettings
    reasons = ("status", "tls", "dns", "connect", "body", "assertion", "redirect")

    def __init__(self, settings: HttpSettings) -> None:
        super().__init__(settings)
        self._session: aiohttp.ClientSession | None = None
        self._shared = False  # the session is one of _SHARED's, released (not closed) on close()
        self._json_checks = [(path, parse_path(path), expected) for path, expected in settings.expect_json.items()]
        self._channel_map = parse_path(settings.channel_map) if settings.channel_map else None
        self._body_regex = compile_regex(settings.expect_body_regex) if settings.expect_body_regex else None
        self._body_not_regex = compile_regex(settings.expect_body_not_regex) if settings.expect_body_not_regex else None
        self._ssl: ssl.SSLContext = client_tls_context(settings.verify_tls, settings.ca_file)
        self._headers = {"User-Agent": USER_AGENT, **settings.headers}
        self._headers.update(marker_headers(settings.synthetic_header))
        self._url = URL(settings.url)
        self._scrub = Scrubber(settings.secret_values())  # before a shown value is cut, or a cut secret slips past

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if self.settings.fresh_connection:
                self._session, self._shared = _SHARED.acquire(self._ssl), True
            else:  # a kept-alive connection is this probe's own: its reuse is what the probe measures
                self._session = _new_session(self._ssl, fresh=False)
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        if self._shared:
            await _SHARED.release(self._ssl)
        else:
            await session.close()

    async def run(self, timer: PhaseTimer) -> Result:
        deadline = perf_counter() + (self.settings.timeout or _DEFAULT_TIMEOUT)
        session = self._ensure_session()
        recorder = _PhaseRecorder(timer=timer, connect_started=0.0, dns_seconds=0.0, tcp_connected=0.0, tls_requested=False)
        token = _RECORDER.set(recorder)
        timer.begin("first_byte")
        try:
            answer = await self._fetch(session, recorder)
        except RedirectRefused as exc:
            return Result.fail("redirect", str(exc))
        except aiohttp.ClientError as exc:
            return client_error_result(exc)
        finally:
            _RECORDER.reset(token)
        status, reason_phrase, body, error, wait = answer
        if error:
            return Result.fail("body", error)
        return await self._judge(status, reason_phrase, body, deadline, wait)

    async def _fetch(
        self, session: aiohttp.ClientSession, recorder: _PhaseRecorder
    ) -> tuple[int, str, bytes, str, float | None]:
        """Status, reason phrase, body, why the body could not be read, and whether a failed status is transient."""
        settings = self.settings
        async with request_following_redirects(
            session, settings.method, self._url, headers=self._headers,
            data=settings.body if settings.body is not None else settings.form, json=settings.body_json,
            follow=settings.follow_redirects, max_redirects=settings.max_redirects,
            allow_other_host=settings.allow_redirect_to_other_host,
            on_redirect=lambda: recorder.timer.begin("first_byte"), trace_request_ctx=recorder,
        ) as response:
            recorder.timer.begin("transfer")
            body, error = await read_limited(response, settings.max_body_bytes)
            recorder.timer.end("transfer")
            return response.status, response.reason or "", body, error, transient_wait(response.status, response.headers)

    async def _judge(self, status: int, reason_phrase: str, body: bytes, deadline: float, wait: float | None) -> Result:
        settings = self.settings
        summary = f"HTTP {status} {reason_phrase}".rstrip()
        checks: list[Check] = []
        if not status_matches(status, settings.expect_status):
            expected = ", ".join(str(s) for s in settings.expect_status)
            checks.append(Check(False, f"[STATUS] {status} in ({expected})"))
            return Result.fail("status", f"{summary}, expected {expected}", checks=tuple(checks), retry_after=wait)
        checks.append(Check(True, f"[STATUS] {status}"))

        channels: dict[str, bool] = {}
        down: list[str] = []  # "channel whatsapp reported inactive", for each channel the platform reports down
        if self._json_checks or self._channel_map:
            try:
                document = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                return Result.fail("assertion", f"{summary} but the body is not JSON: {exc}", checks=tuple(checks))
            for path, steps, expected in self._json_checks:
                actual = lookup(document, steps)
                # JSON true is not 1: Python's True == 1 must not pass a check
                passed = not is_missing(actual) and isinstance(actual, bool) == isinstance(expected, bool) and actual == expected
                shown = "missing" if is_missing(actual) else self._scrub(json.dumps(actual))[:80]
                checks.append(Check(passed, f"[JSON] {path} == {json.dumps(expected)} (got {shown})"))
            if self._channel_map:
                channels, down = self._read_channels(document)

        text = body.decode("utf-8", "replace")
        for pattern, wanted, verb in ((self._body_regex, True, "matches"), (self._body_not_regex, False, "does not match")):
            if pattern is None:
                continue
            shown = f"[BODY] {verb} /{pattern.pattern}/"
            try:  # in a worker thread when it takes long, so the loop stays free; given up before the run's timeout
                found = await search(pattern, text, max(deadline - perf_counter() - _CHECK_MARGIN, 0.0))
            except RegexTimeout as exc:  # undecided is not passed, either way round
                checks.append(Check(False, f"{shown} (gave up after {format_duration(exc.seconds)}: the pattern "
                                           f"backtracks too much on this {len(text)}-character body)"))
                continue
            checks.append(Check((found is not None) == wanted, shown))

        failed = [check.text for check in checks if not check.passed]
        # The channels the platform reports down come first: they say what broke, the failed checks only that it did.
        note = f"; {', '.join(down)}" if down else ""
        if failed:
            return Result.fail("assertion", f"{summary}{note}; failed: {'; '.join(failed)}", checks=tuple(checks), channels=channels)
        return Result.ok(f"{summary}, {len(body)} bytes{note}", checks=tuple(checks), channels=channels)

    def _read_channels(self, document: Any) -> tuple[dict[str, bool], list[str]]:
        """Channel → up, and a phrase for each channel that is down saying what the platform called its state."""
        mapping = lookup(document, self._channel_map) if self._channel_map else None
        if not isinstance(mapping, dict):
            return {}, []
        up_values = {value.lower() for value in self.settings.channel_up_values}
        channels: dict[str, bool] = {}
        down: list[str] = []
        for name, state in list(mapping.items())[:_MAX_CHANNELS]:
            label = str(name).lower()
            if not _CHANNEL_NAME.match(label):  # a label value must stay bounded and tidy
                continue
            channels[label] = state is True or str(state).lower() in up_values
            if not channels[label]:
                shown = state if isinstance(state, str) and state else json.dumps(state)  # "" and null shown as JSON
                down.append(f"channel {label} reported {self._scrub(shown)[:_MAX_STATE_SHOWN]}")
        return channels, sorted(down)


async def _on_connect_start(session: Any, ctx: Any, params: Any) -> None:
    recorder: _PhaseRecorder = ctx.trace_request_ctx
    recorder.connect_started = perf_counter()
    recorder.dns_seconds = 0.0
    recorder.timer.begin("connect")


async def _on_connect_end(session: Any, ctx: Any, params: Any) -> None:
    recorder: _PhaseRecorder = ctx.trace_request_ctx
    now = perf_counter()
    timer = recorder.timer
    if recorder.tcp_connected > recorder.connect_started:
        timer.record("connect", recorder.tcp_connected - recorder.connect_started - recorder.dns_seconds)
        if recorder.tls_requested:
            timer.record("tls", now - recorder.tcp_connected)
    else:
        timer.record("connect", now - recorder.connect_started - recorder.dns_seconds)
    timer.begin("first_byte")


async def _on_dns_start(session: Any, ctx: Any, params: Any) -> None:
    ctx.trace_request_ctx.timer.begin("dns")


async def _on_dns_end(session: Any, ctx: Any, params: Any) -> None:
    recorder: _PhaseRecorder = ctx.trace_request_ctx
    before = recorder.timer.phases.get("dns", 0.0)
    recorder.timer.end("dns")
    recorder.dns_seconds += recorder.timer.phases.get("dns", 0.0) - before
    recorder.timer.current = "connect"


async def _on_reuse(session: Any, ctx: Any, params: Any) -> None:
    ctx.trace_request_ctx.timer.begin("first_byte")


async def _on_headers_received(session: Any, ctx: Any, params: Any) -> None:
    ctx.trace_request_ctx.timer.end("first_byte")
