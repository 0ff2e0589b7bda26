"""`gmail` probe: the platform's Gmail channel stays alive only while its OAuth refresh token works and its
Pub/Sub watch is renewed (Gmail drops a watch silently after 7 days). Each run:

1. `token`: refresh an access token with google-auth from the platform's authorized-user file;
2. `profile`: call Gmail `users.getProfile` with it, proving the API accepts the token;
3. `watch`: when the last known watch expiry is unknown or near, renew through the platform's
   `POST /gmail/setup-watch` and check how long the watch now lasts.

The watch expiry learnt by renewing is kept across a reload and a restart (state key: the renewal endpoint, the
Gmail API and the OAuth client id), so neither renews a watch that has days left. The access token is never kept.

google-auth refreshes synchronously here, in a worker thread, through a requests session that puts a timeout on
every call. Its async path (`google.oauth2._credentials_async` with `google.auth.transport._aiohttp_requests`) is
internal, marked experimental, and retries a 5xx from the token endpoint with `time.sleep` (sync backoff) on the
event loop, stalling every other probe for seconds; `google.auth.aio` has no user-credentials refresh at all.

The credentials file is read when the settings are validated, not when the probe runs: its client secret and
refresh token must be known secrets from load on (the config's scrubber for logs and messages is built from
`secret_values()` then), `check-config` catches a missing or malformed file, and a SIGHUP reload picks up a
rotated one. In a config file, a relative path is the config file's neighbour, like every `*_file` key.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Mapping

import aiohttp
from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, FiniteFloat, SecretStr, field_validator, model_validator,
)

from canary.contract import (
    Duration, Gauge, marker_headers, PhaseTimer, Probe, ProbeSettings, Result, Scrubber, SyntheticHeader, USER_AGENT,
)
from probes.transport import LazySession, client_error_result, http_url, read_limited, url_for_humans

if TYPE_CHECKING:
    from google.auth import exceptions as google_exceptions

WATCH_LIFETIME = 7 * 86400.0
"""How long a Gmail watch lasts after users.watch; the renewal window must fit inside it."""
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
_DEFAULT_REQUEST_TIMEOUT = 10.0  # settings built outside a config file carry no timeout
_TIMEOUT_MARGIN = 1.0  # the runner's timeout, which starts earlier, must win the race and name the phase
_MAX_BODY_BYTES = 1_048_576
_SHOWN_CHARS = 160  # how much of a provider's error text a message quotes


class AuthorizedUser(BaseModel):
    """The platform's authorized-user credentials file, as google-auth reads it."""

    model_config = ConfigDict(frozen=True)

    path: str
    client_id: str
    client_secret: SecretStr
    refresh_token: SecretStr
    token_uri: str | None = None

    def info(self) -> dict[str, str]:
        return {
            "type": "authorized_user",
            "client_id": self.client_id,
            "client_secret": self.client_secret.get_secret_value(),
            "refresh_token": self.refresh_token.get_secret_value(),
        }


def _load_authorized_user(value: Any) -> Any:
    """A path in config becomes the file's parsed, checked content; errors name the file, never its values."""
    if isinstance(value, AuthorizedUser):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be the path of an authorized-user JSON file")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path  # loaded from a config file, a relative path was made its neighbour already
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {str(path)!r} ({exc.strerror or type(exc).__name__}); "
                         "a relative path is resolved against the config file's directory") from None
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{str(path)!r} is not valid JSON") from None
    if not isinstance(document, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object")
    kind = document.get("type", "authorized_user")
    if kind != "authorized_user":
        raise ValueError(f"{str(path)!r} holds {kind!r} credentials; the Gmail channel uses an authorized_user file")
    fields = ("client_id", "client_secret", "refresh_token")
    # What google-auth's Credentials.from_authorized_user_info requires (checked here without importing google-auth,
    # which is heavy; the probe hands it only these fields and token_uri).
    missing = [name for name in fields if name not in document]
    if missing:
        raise ValueError(f"{str(path)!r}: Authorized user info was not in the expected format, missing fields "
                         f"{', '.join(missing)}.")
    if not all(isinstance(document[name], str) and document[name] for name in fields):
        raise ValueError(f"{str(path)!r}: client_id, client_secret and refresh_token must be non-empty strings")
    token_uri = document.get("token_uri")
    return AuthorizedUser(
        path=str(path), client_id=document["client_id"], client_secret=document["client_secret"],
        refresh_token=document["refresh_token"], token_uri=token_uri if isinstance(token_uri, str) and token_uri else None,
    )


class GmailSettings(ProbeSettings):
    type: Literal["gmail"] = "gmail"
    credentials_file: Annotated[AuthorizedUser, BeforeValidator(_load_authorized_user)]
    oauth_token_url: str | None = None
    gmail_api_url: str = "https://gmail.googleapis.com"
    expect_email: str | None = None
    renew: bool = True
    renew_url: str | None = None
    renew_headers: dict[str, SecretStr] = Field(default_factory=dict)
    synthetic_header: SyntheticHeader = "X-Synthetic-Canary: 1"
    renew_before: Duration = 86400.0
    min_watch_remaining: Duration = 86400.0

    @field_validator("oauth_token_url", "renew_url", "expect_email", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `${GMAIL_OAUTH_TOKEN_URL:-}` in config expands to "" when the variable is unset.
        return None if value == "" else value

    @field_validator("oauth_token_url", "renew_url")
    @classmethod
    def _valid_optional_url(cls, url: str | None) -> str | None:
        return None if url is None else http_url(url)

    @field_validator("gmail_api_url")
    @classmethod
    def _valid_api_url(cls, url: str) -> str:
        return http_url(url).rstrip("/")

    @model_validator(mode="after")
    def _coherent_watch(self) -> "GmailSettings":
        if not self.renew:
            return self
        if self.renew_url is None:
            raise ValueError("renew_url is required while renew is on (the platform's POST /gmail/setup-watch)")
        if self.renew_before >= WATCH_LIFETIME:
            raise ValueError("renew_before must be shorter than the 7 days a Gmail watch lasts, or every run renews")
        if self.min_watch_remaining > self.renew_before:
            raise ValueError("min_watch_remaining must not exceed renew_before (the probe renews before it checks)")
        return self

    def token_uri(self) -> str:
        return self.oauth_token_url or self.credentials_file.token_uri or DEFAULT_TOKEN_URI

    def target(self) -> str:
        # Not the credentials file's path: targets are shown on the status page, and a path is an internal detail.
        return f"gmail {url_for_humans(self.gmail_api_url)}"


class _SavedWatch(BaseModel):
    """The state a Gmail probe keeps: when the watch expires, as the last renewal reported it (Unix seconds)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    watch_expiry: FiniteFloat = Field(gt=0)


class GmailProbe(Probe[GmailSettings]):
    settings_model = GmailSettings
    reasons = (
        "invalid_grant", "auth", "expiry", "status", "rate_limited", "assertion",
        "body", "timeout", "tls", "dns", "connect",
    )
    libraries = ("probes.gmail_token",)  # google-auth and requests, for the token refresh

    def __init__(self, settings: GmailSettings) -> None:
        super().__init__(settings)
        self._scrub = Scrubber(settings.secret_values())
        self._watch_expiry: float | None = None  # Unix seconds; learnt only by renewing
        self._renew_headers = {"User-Agent": USER_AGENT}
        self._renew_headers.update({name: value.get_secret_value() for name, value in settings.renew_headers.items()})
        self._renew_headers.update(marker_headers(settings.synthetic_header))
        self._sessions = LazySession(headers={"User-Agent": USER_AGENT})

    async def close(self) -> None:
        await self._sessions.close()

    def state_key(self) -> str:
        settings = self.settings
        return f"{settings.renew_url or ''} {settings.gmail_api_url} {settings.credentials_file.client_id}"

    def export_state(self) -> dict[str, Any]:
        return {} if self._watch_expiry is None else {"watch_expiry": self._watch_expiry}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        expiry = _SavedWatch.model_validate(state).watch_expiry
        if expiry > time.time() + WATCH_LIFETIME + 3600:  # an hour of clock slack; a watch never lasts longer
            raise ValueError("watch_expiry: further ahead than the 7 days a Gmail watch lasts")
        self._watch_expiry = expiry

    async def run(self, timer: PhaseTimer) -> Result:
        gauges: list[Gauge] = []
        with timer.phase("token"):
            token = await self._token(gauges)
        if isinstance(token, Result):
            return token
        with timer.phase("profile"):
            profile = await self._profile(token)
        if isinstance(profile, Result):
            return _with_gauges(profile, gauges)
        notes = [_token_note(gauges), f"Gmail profile of {profile} answered"]
        if self.settings.renew:
            with timer.phase("watch"):
                watch = await self._watch(gauges)
            if isinstance(watch, Result):
                return _with_gauges(watch, gauges)
            notes.append(watch)
        return Result.ok("; ".join(notes), gauges=tuple(gauges))

    # --- token ---------------------------------------------------------------------------------------------------

    async def _token(self, gauges: list[Gauge]) -> str | Result:
        from google.auth import exceptions as google_exceptions

        from probes.gmail_token import Refused, refresh

        settings = self.settings
        token_uri = settings.token_uri()
        timeout = (settings.timeout or _DEFAULT_REQUEST_TIMEOUT) + _TIMEOUT_MARGIN
        try:
            token, expiry = await asyncio.to_thread(refresh, settings.credentials_file.info(), token_uri, timeout)
        except Refused as refused:
            return self._refresh_failure(refused.error, refused.status)
        except google_exceptions.TransportError as exc:
            return _transport_failure(exc, token_uri)
        if expiry is not None:
            gauges.append(Gauge("gmail_access_token_expiry_timestamp_seconds",
                                expiry.replace(tzinfo=timezone.utc).timestamp(),
                                "When the access token refreshed by the last run expires (Unix time)."))
        return token

    def _refresh_failure(self, exc: google_exceptions.RefreshError, status: int | None) -> Result:
        data = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
        error = data.get("error") if isinstance(data.get("error"), str) else ""
        description = data.get("error_description") if isinstance(data.get("error_description"), str) else ""
        said = self._quote(f"{error}: {description}" if description else error or str(exc.args[0] if exc.args else exc))
        said = f"HTTP {status}: {said}" if status else said
        where = url_for_humans(self.settings.token_uri())
        if error == "invalid_grant":
            return Result.fail("invalid_grant", f"the token endpoint refused the refresh token ({said}): it was revoked "
                               "or has expired, so the platform's Gmail channel will stop sending and receiving mail "
                               "until the mailbox is authorised again")
        if getattr(exc, "retryable", False) or (status or 0) >= 500:  # a non-JSON 5xx is retried, but flagged not retryable
            return Result.fail("status", f"the token endpoint {where} failed with a server-side error ({said}), "
                               "also after google-auth's retries")
        if error:
            return Result.fail("auth", f"the token endpoint {where} refused the OAuth client ({said}); check client_id "
                               "and client_secret in the credentials_file")
        return Result.fail("status", f"the token endpoint {where} did not answer with a token or an OAuth error ({said})")

    # --- profile -------------------------------------------------------------------------------------------------

    async def _profile(self, token: str) -> str | Result:
        url = f"{self.settings.gmail_api_url}/gmail/v1/users/me/profile"
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        try:
            async with self._sessions.get().get(url, headers=headers, allow_redirects=False) as response:
                body, error = await read_limited(response, _MAX_BODY_BYTES)
                status = response.status
        except aiohttp.ClientError as exc:
            failed = client_error_result(exc)
            return Result.fail(failed.reason, f"Gmail API {url_for_humans(url)}: {failed.message}")
        if error:
            return Result.fail("body", f"Gmail users.getProfile: {error}")
        if status != 200:
            return self._profile_refused(status, body)
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return Result.fail("assertion", "Gmail users.getProfile answered HTTP 200 but not with JSON")
        email = document.get("emailAddress") if isinstance(document, dict) else None
        if not isinstance(email, str) or not email:
            return Result.fail("assertion", "Gmail users.getProfile answered without an emailAddress")
        expected = self.settings.expect_email
        if expected and email.lower() != expected.lower():
            return Result.fail("assertion", f"the token belongs to mailbox {email}, expected {expected}")
        return email

    def _profile_refused(self, status: int, body: bytes) -> Result:
        said = self._quote(_google_error_text(body))
        summary = f"Gmail users.getProfile answered HTTP {status}" + (f" ({said})" if said else "")
        if status in (401, 403):
            return Result.fail("auth", f"{summary}: the Gmail API refused the freshly refreshed access token")
        if status == 429:
            return Result.fail("rate_limited", f"{summary}: the Gmail API is rate limiting this project")
        return Result.fail("status", f"{summary}, expected 200")

    # --- watch ---------------------------------------------------------------------------------------------------

    async def _watch(self, gauges: list[Gauge]) -> str | Result:
        settings = self.settings
        known = self._watch_expiry
        if known is not None and known - time.time() > settings.renew_before:
            gauges.append(_watch_gauge(known))
            return f"watch expires in {_days(known - time.time())} (renewal not due)"
        renewed = await self._renew()
        if isinstance(renewed, Result):
            if known is not None:
                gauges.append(_watch_gauge(known))
            return renewed
        self._watch_expiry = renewed
        gauges.append(_watch_gauge(renewed))
        remaining = renewed - time.time()
        if remaining < settings.min_watch_remaining:
            when = f"in {_days(remaining)}" if remaining > 0 else f"{_days(-remaining)} ago"
            return Result.fail("expiry", f"after renewal the Gmail watch expires {when}, expected at least "
                               f"{_days(settings.min_watch_remaining)} (a renewed watch lasts 7 days): the renewal "
                               "did not take, and Gmail will stop pushing new mail when it lapses")
        return f"watch renewed, expires in {_days(remaining)}"

    async def _renew(self) -> float | Result:
        url = self.settings.renew_url or ""
        shown = url_for_humans(url)
        try:
            async with self._sessions.get().post(url, headers=self._renew_headers, allow_redirects=False) as response:
                body, error = await read_limited(response, _MAX_BODY_BYTES)
                status = response.status
        except aiohttp.ClientError as exc:
            failed = client_error_result(exc)
            return Result.fail(failed.reason, f"the Gmail watch could not be renewed: {shown}: {failed.message}")
        if error:
            return Result.fail("body", f"the Gmail watch could not be renewed: {shown}: {error}")
        if not 200 <= status < 300:
            said = self._quote(body.decode("utf-8", "replace"))
            return Result.fail("status", f"the Gmail watch could not be renewed: POST {shown} answered HTTP {status}"
                               + (f" ({said})" if said else ""))
        expiry = parse_expiration(body)
        if expiry is None:
            return Result.fail("assertion", f"the Gmail watch could not be renewed: POST {shown} answered without an "
                               "expiration (epoch milliseconds)")
        return expiry

    def _quote(self, text: str) -> str:
        """Provider text, scrubbed and kept short, for a message."""
        text = " ".join(self._scrub(text).split())
        return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def parse_expiration(body: bytes) -> float | None:
    """`{"expiration": "1700000000000"}` (Gmail sends int64 as a string; a number is accepted too) → Unix seconds."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    raw = document.get("expiration") if isinstance(document, dict) else None
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        return None
    try:
        milliseconds = float(raw)
    except ValueError:
        return None
    return milliseconds / 1000 if milliseconds > 0 and milliseconds == milliseconds else None


def _google_error_text(body: bytes) -> str:
    """Google APIs' `{"error": {"status", "message"}}`, or the start of whatever came instead."""
    try:
        document = json.loads(body)
        error = document["error"]
        return f"{error.get('status', '')}: {error.get('message', '')}".strip(": ")
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        return body.decode("utf-8", "replace")


def _transport_failure(exc: google_exceptions.TransportError, token_uri: str) -> Result:
    import requests

    where = url_for_humans(token_uri)
    cause = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
    if isinstance(cause, requests.exceptions.Timeout):
        return Result.fail("timeout", f"the token endpoint {where} did not answer in time")
    return Result.fail("connect", f"cannot reach the token endpoint {where}: {_root_cause(cause)}")


def _root_cause(exc: BaseException) -> str:
    """The innermost OS-level reason ("Connection refused") of a requests/urllib3 error chain."""
    seen: set[int] = set()
    found: BaseException = exc
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = current
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        reason = getattr(current, "reason", None)
        nested = current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        current = reason if isinstance(reason, BaseException) else nested or current.__cause__ or current.__context__
    return type(found).__name__


def _watch_gauge(expiry: float) -> Gauge:
    return Gauge("gmail_watch_expiry_timestamp_seconds", expiry,
                 "When the Gmail Pub/Sub watch expires, as the last renewal reported it (Unix time).")


def _days(seconds: float) -> str:
    """Readable at the scales a watch and a token live on: 6.9d, 23.5h, 59m, 40s."""
    seconds = max(seconds, 0.0)
    if seconds >= 86400:
        return f"{seconds / 86400:.1f}d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 60:
        return f"{seconds // 60:.0f}m"
    return f"{seconds:.0f}s"


def _token_note(gauges: list[Gauge]) -> str:
    expiry = next((g.value for g in gauges if g.name == "gmail_access_token_expiry_timestamp_seconds"), None)
    return "access token refreshed" + (f" (valid {_days(expiry - time.time())})" if expiry is not None else "")


def _with_gauges(result: Result, gauges: list[Gauge]) -> Result:
    return Result.fail(result.reason, result.message, gauges=tuple(gauges), checks=result.checks)
