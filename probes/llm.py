"""`llm` probe: an OpenAI-compatible API (Groq first) lists the configured model and answers a 1-token prompt.

Each run asks `GET /models` whether the model is still served, then times one `POST /chat/completions` capped at
one token (the `completion` phase). The rate-limit headers Groq and OpenAI send on every answer become gauges, and
the run fails before the quota runs out (`min_headroom`). A 429's `retry-after` is honoured: until it passes, runs
fail fast without sending anything, so the canary never adds to the load that got it limited. The back-off is kept
across a reload and a restart (state key: base_url and model), stored as the wall-clock time it ends.

Plain aiohttp rather than the `openai` package: two small JSON calls, the raw headers of every answer, no retries
of its own and no extra dependency; the runner's cancellation bounds every call.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from time import monotonic, perf_counter
from typing import Any, Literal, Mapping

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, SecretStr, field_validator
from yarl import URL

from canary.contract import (
    Duration, format_duration, Gauge, PhaseTimer, Probe, ProbeSettings, Result, Scrubber, USER_AGENT,
)
from probes.transport import MAX_RETRY_AFTER, LazySession, client_error_result, parse_retry_after, read_limited

DEFAULT_BASE_URL = "https://api.groq.com/openai/v1"
DEFAULT_MODEL = "meta-llama/llama-4-scout-17b-16e-instruct"
DEFAULT_PROMPT = "Reply with the single word OK. (synthetic canary check)"
RATE_LIMIT_KINDS = ("requests", "tokens")
MAX_BACKOFF_SECONDS = MAX_RETRY_AFTER  # a bogus retry-after must not silence the probe for days
_MAX_BODY_BYTES = 2_097_152
_MAX_PROVIDER_TEXT = 200
_NEAREST_IDS = 3
_MODEL_GONE_CODES = {"model_not_found", "model_decommissioned", "model_not_available"}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|μs|ms|s|m|h|d)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class LlmSettings(ProbeSettings):
    type: Literal["llm"] = "llm"
    base_url: str = DEFAULT_BASE_URL
    api_key: SecretStr
    model: str = Field(default=DEFAULT_MODEL, min_length=1, max_length=200)
    prompt: str = Field(default=DEFAULT_PROMPT, min_length=1, max_length=2000)
    slow_after: Duration = 10.0
    min_headroom: float = Field(default=0.1, ge=0, le=1)

    @field_validator("base_url")
    @classmethod
    def _valid_base_url(cls, url: str) -> str:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError("must be an absolute http:// or https:// URL such as https://api.groq.com/openai/v1")
        if parsed.user or parsed.password or parsed.query_string:
            raise ValueError("must not carry credentials or a query string (the key goes in api_key)")
        return url.rstrip("/")

    @field_validator("api_key")
    @classmethod
    def _valid_key(cls, key: SecretStr) -> SecretStr:
        value = key.get_secret_value()
        if not value or any(ch.isspace() or ord(ch) < 32 for ch in value):
            # "value" first: the config scrubber masks the first word after `api_key:` in a message.
            raise ValueError("value must be non-empty, without spaces or control characters")
        return key

    def check_timing(self, timeout: float, inherited_from: str | None) -> str | None:
        """The timeout must outlast slow_after, so a slow answer is reported as `slow` (it came) rather than as
        `timeout` (it did not). The message names the key the user wrote, or the default the timeout came from."""
        if timeout > self.slow_after:
            return None
        if inherited_from is None:
            return (f"timeout: {format_duration(timeout)} must be longer than slow_after {format_duration(self.slow_after)}, "
                    "or a slow answer is cut off as a timeout instead of reported as slow")
        return (f"slow_after: {format_duration(self.slow_after)} must be shorter than the probe's timeout "
                f"{format_duration(timeout)} (inherited from {inherited_from}); set a longer timeout on the probe, "
                "or a shorter slow_after")

    def target(self) -> str:
        return f"{self.model} at {self.base_url}"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One kind of quota (requests or tokens) as the provider's headers describe it."""

    kind: str
    limit: float | None
    remaining: float | None
    reset_seconds: float | None

    @property
    def headroom(self) -> float | None:
        if self.limit is None or self.remaining is None or self.limit <= 0:
            return None
        return max(self.remaining, 0.0) / self.limit


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes
    error: str  # set when the body could not be read


def parse_reset(text: str | None) -> float | None:
    """A reset header in seconds: Go-style durations ("2m59.56s", "7.66s", "1h2m3s", "250ms") or plain seconds."""
    if text is None:
        return None
    cleaned = text.strip()
    try:
        seconds = float(cleaned)
    except ValueError:
        position, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(cleaned):
            if match.start() != position:
                return None
            seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            position = match.end()
        if position == 0 or position != len(cleaned):
            return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def read_rate_limits(headers: Mapping[str, str]) -> list[RateLimit]:
    """The `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers Groq and OpenAI send."""
    limits = []
    for kind in RATE_LIMIT_KINDS:
        limit = _number(headers.get(f"x-ratelimit-limit-{kind}"))
        remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
        reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
        if limit is not None or remaining is not None or reset is not None:
            limits.append(RateLimit(kind, limit, remaining, reset))
    return limits


def rate_limit_gauges(limits: list[RateLimit]) -> list[Gauge]:
    gauges = []
    for quota in limits:
        kind = (("kind", quota.kind),)
        if quota.limit is not None:
            gauges.append(Gauge("llm_ratelimit_limit", quota.limit, "The provider's quota of this kind (x-ratelimit-limit-*).", kind))
        if quota.remaining is not None:
            gauges.append(Gauge("llm_ratelimit_remaining", quota.remaining, "Quota left in the current window (x-ratelimit-remaining-*).", kind))
        if quota.reset_seconds is not None:
            gauges.append(Gauge("llm_ratelimit_reset_seconds", quota.reset_seconds, "Seconds until the quota window resets (x-ratelimit-reset-*).", kind))
        if quota.headroom is not None:
            gauges.append(Gauge("llm_ratelimit_headroom_ratio", quota.headroom, "Quota left as a fraction of the limit (remaining / limit).", kind))
    return gauges


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def provider_error(body: bytes, scrub: Scrubber) -> tuple[str, str]:
    """(code, message) from the OpenAI error shape `{"error": {"message", "type", "code"}}`, each bounded.

    Scrubbed before it is cut, so a secret the provider echoes cannot survive as a fragment the runner misses."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        document = body.decode("utf-8", "replace")
    error = document.get("error") if isinstance(document, dict) else document
    if isinstance(error, str):
        return "", _bounded(" ".join(scrub(error).split()))
    if not isinstance(error, dict):
        return "", ""
    code = error.get("code") or error.get("type") or ""
    return _bounded(scrub(str(code)), 60), _bounded(" ".join(scrub(str(error.get("message") or "")).split()))


def _bounded(text: str, limit: int = _MAX_PROVIDER_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def nearest_models(model: str, served: list[str]) -> list[str]:
    """The few served ids closest to the configured one, so a typo or a renamed model shows at a glance."""
    close = difflib.get_close_matches(model, served, n=_NEAREST_IDS, cutoff=0.3)
    return [_bounded(name, 80) for name in (close or sorted(served)[:_NEAREST_IDS])]


class _SavedQuota(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    kind: Literal["requests", "tokens"]
    limit: FiniteFloat | None = None
    remaining: FiniteFloat | None = None


class _SavedBackoff(BaseModel):
    """The back-off as exported: when it ends (Unix seconds) and the quotas the 429 reported."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    retry_at: FiniteFloat
    quotas: list[_SavedQuota] = Field(default_factory=list, max_length=len(RATE_LIMIT_KINDS))


class LlmProbe(Probe[LlmSettings]):
    settings_model = LlmSettings
    reasons = (
        "status", "tls", "dns", "connect", "body", "auth",
        "rate_limited", "model_missing", "slow", "assertion",
    )
    figure_labels = frozenset({"kind"})

    def __init__(self, settings: LlmSettings) -> None:
        super().__init__(settings)
        self._base = URL(settings.base_url)
        self._retry_at = 0.0  # monotonic time before which the provider asked not to be called
        self._retry_at_utc: datetime | None = None
        self._limited: tuple[RateLimit, ...] = ()  # the quotas the 429 reported, shown while backing off
        self._scrub = Scrubber(settings.secret_values())
        self._headers = {
            "Authorization": f"Bearer {settings.api_key.get_secret_value()}",
            "User-Agent": USER_AGENT,
            "X-Synthetic-Canary": "1",
        }
        self._sessions = LazySession(headers=self._headers)

    async def close(self) -> None:
        await self._sessions.close()

    def state_key(self) -> str:
        return f"{self.settings.base_url} {self.settings.model}"

    def export_state(self) -> dict[str, Any]:
        if self._retry_at_utc is None or self._retry_at - monotonic() <= 0:
            return {}
        quotas = [{"kind": q.kind, "limit": q.limit, "remaining": q.remaining} for q in self._limited]
        return {"retry_at": self._retry_at_utc.timestamp(), "quotas": quotas}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        saved = _SavedBackoff.model_validate(state)
        if len({q.kind for q in saved.quotas}) != len(saved.quotas):
            raise ValueError("quotas: a kind appears twice")  # it would export one series twice
        waiting = saved.retry_at - time.time()
        if waiting > MAX_BACKOFF_SECONDS + 60:  # a little clock slack; anything longer was never ours
            raise ValueError(f"a back-off of {format_duration(waiting)} is longer than the probe ever keeps "
                             f"({format_duration(MAX_BACKOFF_SECONDS)})")
        if waiting <= 0:
            return
        self._retry_at = monotonic() + waiting
        self._retry_at_utc = datetime.fromtimestamp(saved.retry_at, timezone.utc)
        self._limited = tuple(RateLimit(q.kind, q.limit, q.remaining, None) for q in saved.quotas)

    async def run(self, timer: PhaseTimer) -> Result:
        result = await self._run(timer)
        backoff = Gauge("llm_backoff_seconds", max(self._retry_at - monotonic(), 0.0),
                        "Seconds left before the probe calls the provider again (a 429's retry-after).")
        return replace(result, gauges=(*result.gauges, backoff))

    async def _run(self, timer: PhaseTimer) -> Result:
        waiting = self._retry_at - monotonic()
        if waiting > 0:
            return self._still_limited(waiting)
        session = self._sessions.get()
        try:
            with timer.phase("models"):
                listed = await self._call(session, "GET", "models")
            refused = self._refused(listed, "GET /models")
            if refused is not None:
                return refused
            missing = self._model_missing(listed)
            if missing is not None:
                return missing
            with timer.phase("completion"):
                started = perf_counter()
                answered = await self._call(session, "POST", "chat/completions", self._completion_request())
                seconds = perf_counter() - started
        except aiohttp.ClientError as exc:
            return client_error_result(exc)
        refused = self._refused(answered, "POST /chat/completions")
        if refused is not None:
            return refused
        return self._judge(answered, seconds)

    def _completion_request(self) -> dict[str, Any]:
        return {
            "model": self.settings.model,
            "messages": [{"role": "user", "content": self.settings.prompt}],
            "max_tokens": 1,
            "temperature": 0,
        }

    async def _call(self, session: aiohttp.ClientSession, method: str, path: str, body: Any = None) -> _Answer:
        async with session.request(method, self._base / path, json=body, allow_redirects=False) as response:
            content, error = await read_limited(response, _MAX_BODY_BYTES)
            return _Answer(response.status, response.headers, content, error)

    def _refused(self, answer: _Answer, call: str) -> Result | None:
        """The failed Result for an answer that is not a 2xx, by what the provider meant; None for a 2xx."""
        if 200 <= answer.status < 300:
            return None
        gauges = tuple(rate_limit_gauges(read_rate_limits(answer.headers)))
        code, text = provider_error(answer.body, self._scrub)
        said = f" ({', '.join(part for part in (code, text) if part)})" if code or text else ""
        if answer.status in (401, 403):
            # Only the code: some providers quote part of the refused key in their message.
            return Result.fail("auth", f"the provider refused the API key: HTTP {answer.status} on {call}"
                               f"{f' ({code})' if code else ''}", gauges=gauges)
        if answer.status == 429:
            return self._rate_limited(answer, call, said, gauges)
        if call.startswith("POST") and (code in _MODEL_GONE_CODES or (answer.status == 404 and "model" in text.lower())):
            return Result.fail("model_missing", f"model {self.settings.model} is not available: HTTP {answer.status} "
                               f"on {call}{said}", gauges=gauges)
        return Result.fail("status", f"HTTP {answer.status} on {call}, expected 200{said}", gauges=gauges)

    def _rate_limited(self, answer: _Answer, call: str, said: str, gauges: tuple[Gauge, ...]) -> Result:
        given = (answer.headers.get("retry-after") or "").strip()
        wait = parse_retry_after(given)
        if not given:
            note = "; no retry-after given, so the next run calls again"
        elif wait is None:
            note = f"; retry-after {given[:40]!r} is neither seconds nor an HTTP date, so the next run calls again"
        else:
            note = "; the retry-after has passed already, so the next run calls again"
        if wait is not None and wait > 0:
            self._retry_at = monotonic() + wait
            self._retry_at_utc = datetime.now(timezone.utc) + timedelta(seconds=wait)
            self._limited = tuple(replace(q, reset_seconds=None) for q in read_rate_limits(answer.headers))
            note = f"; not calling again before {_clock(self._retry_at_utc)} (retry-after {format_duration(wait)})"
        return Result.fail("rate_limited", f"the provider rate-limited the canary: HTTP 429 on {call}{said}{note}",
                           gauges=gauges)

    def _still_limited(self, waiting: float) -> Result:
        when = _clock(self._retry_at_utc) if self._retry_at_utc else "later"
        return Result.fail(
            "rate_limited",
            f"not calling the provider: it answered 429 and asked to wait; will try again at {when} "
            f"(in {format_duration(waiting)}); no request sent",
            gauges=tuple(rate_limit_gauges(list(self._limited))),
        )

    def _model_missing(self, answer: _Answer) -> Result | None:
        model = self.settings.model
        if answer.error:
            return Result.fail("body", f"GET /models: {answer.error}")
        try:
            data = json.loads(answer.body)["data"]
            entries = {str(item["id"]): item for item in data if isinstance(item, dict) and "id" in item}
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            return Result.fail("assertion", "GET /models answered 200 but not with an OpenAI model list ({\"data\": [{\"id\": …}]})")
        entry = entries.get(model)
        if entry is None:
            nearest = ", ".join(nearest_models(model, list(entries))) or "none"
            return Result.fail("model_missing", f"model {model} is not among the {len(entries)} models the provider "
                               f"serves; nearest: {nearest}")
        if entry.get("active") is False:  # Groq lists retired models with "active": false
            return Result.fail("model_missing", f"model {model} is listed but marked inactive")
        return None

    def _judge(self, answer: _Answer, seconds: float) -> Result:
        settings = self.settings
        limits = read_rate_limits(answer.headers)
        gauges = tuple(rate_limit_gauges(limits))
        if answer.error:
            return Result.fail("body", f"POST /chat/completions: {answer.error}", gauges=gauges)
        try:
            document = json.loads(answer.body)
            choices = document["choices"]
            if not isinstance(choices, list) or not choices:
                raise TypeError("no choices")
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            return Result.fail("assertion", "POST /chat/completions answered 200 but not with a chat completion "
                               "(no choices)", gauges=gauges)
        problems: list[tuple[str, str]] = []
        for quota in limits:
            if quota.headroom is not None and quota.headroom < settings.min_headroom:
                reset = f", resets in {_span(quota.reset_seconds)}" if quota.reset_seconds is not None else ""
                problems.append(("rate_limited", f"{quota.kind} headroom {quota.remaining:g} of {quota.limit:g} "
                                 f"({quota.headroom:.1%}) is below min_headroom {settings.min_headroom:.0%}{reset}"))
        if seconds > settings.slow_after:
            problems.append(("slow", f"the 1-token completion took {seconds:.2f}s, over slow_after "
                             f"{format_duration(settings.slow_after)}"))
        if problems:
            return Result.fail(problems[0][0], "; ".join(text for _, text in problems), gauges=gauges)
        headroom = ", ".join(f"{q.kind} headroom {q.headroom:.0%}" for q in limits if q.headroom is not None)
        return Result.ok(f"{settings.model} listed and answered 1 token in {seconds:.2f}s"
                         f"{f'; {headroom}' if headroom else ''}", gauges=gauges)


def _span(seconds: float) -> str:
    """A reset time as people read it: "250ms", "7.7s", "2m59s", "1h2m"."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _clock(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
