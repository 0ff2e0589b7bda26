"""`whatsapp` probe: plays Twilio delivering an inbound WhatsApp message to the platform's webhook.

One run posts the form fields Twilio posts, with a fresh MessageSid, signed with `X-Twilio-Signature` by the
twilio package over the PUBLIC URL Twilio would call (the platform usually sits behind a proxy or tunnel, and
checks signatures against the URL Twilio called, not the one it received). A 2xx with TwiML passes the `signed` phase. Then, unless turned
off, the `forged` phase sends the identical request with a wrong signature and the `unsigned` phase sends it with
no `X-Twilio-Signature` at all; both must be refused: a platform that accepts either would take messages from
anyone (a validator that only checks a signature when one is present is a common bug), and fails the probe as
`insecure`. An optional `cleanup` request removes what the message created, after the checks, whatever they
found — also when the runner's timeout or a stop cut the checks off: it is shielded from the run's cancellation
and bounded by `cleanup_timeout` (see `probes/cleanup.py`), so a run lasts at most `timeout + cleanup_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import ssl
from contextlib import nullcontext
from dataclasses import replace
from typing import Literal, Mapping
from urllib.parse import urlsplit
from xml.etree import ElementTree

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from twilio.request_validator import SIGNATURE_HEADER, RequestValidator

from canary.contract import (
    Check, Duration, format_duration, marker_headers, PhaseTimer, Probe, ProbeSettings, Result, SyntheticHeader,
)
from probes.cleanup import ShieldedCleanups
from probes.twilio_account import AccountSid
from probes.transport import (
    LazySession,
    CaFile, ExpectedStatuses, HttpUrl, client_error_result, client_tls_context, http_url, read_limited,
    secret_headers, status_matches,
)

log = logging.getLogger("probes.whatsapp")
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
_MESSAGE_SID = re.compile(r"^SM[0-9a-f]{32}$")  # what run() makes: "SM" and 16 random bytes in hex
_TWILIO_USER_AGENT = "TwilioProxy/1.1"  # what Twilio's webhook requests carry
_AUTH_REFUSED = (401, 403)
# The requests that must be refused, by phase: how a refusal reads, and what accepting one means.
_REFUSED = {"forged": "forged signature", "unsigned": "unsigned request"}
_ACCEPTED = {
    "forged": "the platform accepted a webhook with a forged X-Twilio-Signature (HTTP {status}); it must refuse it "
              "with {expected}: anyone can post messages as Twilio",
    "unsigned": "the platform accepts unsigned webhooks: a request without X-Twilio-Signature was answered "
                "HTTP {status}; it must refuse it with {expected}: anyone can post messages as Twilio",
}


def _shown(statuses: list[int | str]) -> str:
    return ", ".join(str(status) for status in statuses)


class WhatsAppCleanup(BaseModel):
    """A request that removes what the synthetic message created; `{message_sid}` in the URL is filled in."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    method: Literal["DELETE", "POST", "PUT", "PATCH", "GET"] = "DELETE"
    url: str
    expect_status: ExpectedStatuses = Field(default_factory=lambda: ["2xx", 404])  # already gone is fine

    @field_validator("url")
    @classmethod
    def _valid_template(cls, url: str) -> str:
        try:
            filled = url.format(message_sid="SM" + "0" * 32)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only {{message_sid}} may be filled in ({type(exc).__name__}: {exc})") from None
        http_url(filled)
        return url


class WhatsAppSettings(ProbeSettings):
    type: Literal["whatsapp"] = "whatsapp"
    url: HttpUrl
    public_url: str | None = None
    auth_token: SecretStr
    account_sid: AccountSid
    from_number: str
    to_number: str
    body: str = Field(default="[canary] synthetic check", min_length=1, max_length=1600)
    profile_name: str = Field(default="Channel Canary", max_length=100)
    # Both govern the forged AND the unsigned request: answers that count as refusing them, and whether to send them.
    expect_forged_status: ExpectedStatuses = Field(default_factory=lambda: [403])
    check_forged: bool = True
    headers: dict[str, str] = Field(default_factory=dict)
    synthetic_header: SyntheticHeader = "X-Synthetic-Canary: 1"
    verify_tls: bool = True
    ca_file: CaFile | None = None
    max_body_bytes: int = Field(default=65_536, gt=0)
    cleanup: WhatsAppCleanup | None = None
    cleanup_timeout: Duration = 5.0

    @field_validator("public_url")
    @classmethod
    def _valid_public_url(cls, url: str | None) -> str | None:
        return http_url(url) if url else None  # empty (an unset ${VAR:-}) means "the same as url"

    @field_validator("from_number", "to_number")
    @classmethod
    def _valid_number(cls, number: str) -> str:
        number = number.strip().removeprefix("whatsapp:")
        if not _E164.match(number):
            raise ValueError(f"must be an E.164 number such as +14155238886 (optionally whatsapp:+...), got {number!r}")
        return number

    @field_validator("expect_forged_status")
    @classmethod
    def _forged_not_accepted(cls, statuses: list[int | str]) -> list[int | str]:
        accepted = [status for status in statuses if str(status).startswith("2")]
        if accepted:
            raise ValueError(f"a forged webhook must be refused; {_shown(accepted)} would pass an accepted forgery")
        return statuses

    def signed_url(self) -> str:
        """The URL Twilio would call, which the signature covers.

        A public_url with no path (`https://support.example.com`) is the proxy's base and takes url's path and
        query, like the platform's own PLATFORM_PUBLIC_URL; a public_url with a path is used as it is."""
        if not self.public_url:
            return self.url
        public = urlsplit(self.public_url)
        if public.path not in ("", "/") or public.query:
            return self.public_url
        own = urlsplit(self.url)
        return self.public_url.rstrip("/") + own.path + (f"?{own.query}" if own.query else "")

    def cleanup_bound(self) -> float:
        return self.cleanup_timeout if self.cleanup is not None else 0.0

    def leaves_objects(self) -> bool:
        return self.cleanup is not None

    def target(self) -> str:
        return f"POST {self.url.for_humans()}"  # type: ignore[attr-defined]

    def secret_values(self) -> list[str]:
        return super().secret_values() + secret_headers(self.headers)


class WhatsAppProbe(Probe[WhatsAppSettings]):
    settings_model = WhatsAppSettings
    reasons = ("status", "tls", "dns", "connect", "body", "auth", "assertion", "insecure", "cleanup")

    def __init__(self, settings: WhatsAppSettings) -> None:
        super().__init__(settings)
        self._validator = RequestValidator(settings.auth_token.get_secret_value())
        self._headers = {"User-Agent": _TWILIO_USER_AGENT, "Accept": "*/*", **settings.headers}
        self._headers.update(marker_headers(settings.synthetic_header))
        self._ssl: ssl.SSLContext = client_tls_context(settings.verify_tls, settings.ca_file)
        self._sessions = LazySession(ssl_context=self._ssl, force_close=True, limit=2)
        self._cleanups = ShieldedCleanups()

    async def close(self) -> None:
        await self._cleanups.drain()
        await self._sessions.close()

    def message_params(self, message_sid: str) -> dict[str, str]:
        """The form fields of an inbound WhatsApp text message, in the order Twilio sends them."""
        settings = self.settings
        return {
            "SmsMessageSid": message_sid,
            "NumMedia": "0",
            "ProfileName": settings.profile_name,
            "MessageType": "text",
            "SmsSid": message_sid,
            "WaId": settings.from_number.removeprefix("+"),
            "SmsStatus": "received",
            "Body": settings.body,
            "To": f"whatsapp:{settings.to_number}",
            "NumSegments": "1",
            "ReferralNumMedia": "0",
            "MessageSid": message_sid,
            "AccountSid": settings.account_sid,
            "From": f"whatsapp:{settings.from_number}",
            "ApiVersion": "2010-04-01",
        }

    async def run(self, timer: PhaseTimer) -> Result:
        message_sid = "SM" + secrets.token_hex(16)
        params = self.message_params(message_sid)
        if self.settings.cleanup is None:
            return await self._checks(params, timer)
        # On disk before the message is sent: a process killed from here on leaves an entry the janitor (or the next
        # start) removes with the cleanup request, even when the platform never answered.
        await self.ledger.record(message_sid, {"message_sid": message_sid})
        try:
            result = await self._checks(params, timer)
        except BaseException:
            # Timed out or stopped mid-check: the message may exist already; remove it before the exception goes on.
            outcome = await self._cleanups.run(self._cleanup(message_sid, None), if_interrupted=self._log_interrupted)
            self._log_interrupted(outcome)
            await self.ledger.settle(message_sid, removed=outcome[0])
            raise
        # Shielded here too: the runner's timeout may fire while the cleanup runs.
        outcome = await self._cleanups.run(self._cleanup(message_sid, timer), if_interrupted=self._log_interrupted)
        await self.ledger.settle(message_sid, removed=outcome[0])
        return _with_cleanup(result, *outcome)

    async def remove_leftover(self, variables: Mapping[str, str]) -> str | None:
        """An earlier run's message, from the ledger: the cleanup request again; a 404 means it is gone."""
        if self.settings.cleanup is None:
            return "the probe has no cleanup request any more"
        message_sid = variables.get("message_sid", "")
        if not _MESSAGE_SID.match(message_sid):  # the entry comes from a file: never put anything else in a URL
            return "the ledger entry holds no message SID"
        passed, detail = await self._cleanup(message_sid, None, gone_is_fine=True)
        return None if passed else detail

    async def _checks(self, params: dict[str, str], timer: PhaseTimer) -> Result:
        signature = self._validator.compute_signature(self.settings.signed_url(), params)
        try:
            with timer.phase("signed"):
                status, body, error = await self._post(params, signature)
        except aiohttp.ClientError as exc:
            return _in_phase("signed webhook", client_error_result(exc))
        if error:
            return Result.fail("body", f"signed webhook: {error}")
        signed = self._judge_signed(status, body)
        if not signed.success or not self.settings.check_forged:
            return signed
        # A well-formed signature made with a key that is not the auth token: what a forger can produce.
        forged_signature = RequestValidator(secrets.token_urlsafe(24)).compute_signature(
            self.settings.signed_url(), params
        )
        forged = await self._must_be_refused("forged", params, forged_signature, signed, timer)
        if not forged.success:
            return forged
        return await self._must_be_refused("unsigned", params, None, forged, timer)

    async def _must_be_refused(
        self, phase: str, params: dict[str, str], signature: str | None, before: Result, timer: PhaseTimer
    ) -> Result:
        """Send the same message with a bad signature or none; `before` is the result so far, to extend."""
        try:
            with timer.phase(phase):
                status, _, _ = await self._post(params, signature)
        except aiohttp.ClientError as exc:
            return _in_phase(f"{phase} webhook", client_error_result(exc), before.checks)
        return self._judge_refusal(phase, status, before)

    async def _post(self, params: dict[str, str], signature: str | None) -> tuple[int, bytes, str]:
        headers = {**self._headers, SIGNATURE_HEADER: signature} if signature is not None else self._headers
        session = self._sessions.get()
        async with session.post(self.settings.url, data=params, headers=headers, allow_redirects=False) as response:
            body, error = await read_limited(response, self.settings.max_body_bytes)
            return response.status, body, error

    def _judge_signed(self, status: int, body: bytes) -> Result:
        if status in _AUTH_REFUSED:
            return Result.fail(
                "auth",
                f"the platform refused a correctly signed webhook with HTTP {status}: it validates with another auth "
                "token (rotated?) or another public URL",
                checks=(Check(False, f"[SIGNED] HTTP {status} in (2xx)"),),
            )
        if not 200 <= status < 300:
            return Result.fail("status", f"signed webhook answered HTTP {status}, expected 2xx",
                               checks=(Check(False, f"[SIGNED] HTTP {status} in (2xx)"),))
        checks = [Check(True, f"[SIGNED] HTTP {status}")]
        problem = _twiml_problem(body)
        checks.append(Check(problem is None, f"[TWIML] <Response> document{f' ({problem})' if problem else ''}"))
        if problem:
            return Result.fail("assertion", f"signed webhook answered HTTP {status} but not with TwiML: {problem}",
                               checks=tuple(checks))
        return Result.ok(f"signed webhook answered HTTP {status} with TwiML", checks=tuple(checks))

    def _judge_refusal(self, phase: str, status: int, before: Result) -> Result:
        expected = _shown(self.settings.expect_forged_status)
        passed = status_matches(status, self.settings.expect_forged_status)
        checks = (*before.checks, Check(passed, f"[{phase.upper()}] HTTP {status} in ({expected})"))
        if passed:
            return Result.ok(f"{before.message}; {_REFUSED[phase]} refused with HTTP {status}", checks=checks)
        if 200 <= status < 300:
            return Result.fail("insecure", _ACCEPTED[phase].format(status=status, expected=expected), checks=checks)
        return Result.fail("status", f"{phase} webhook answered HTTP {status}, expected {expected}", checks=checks)

    def _log_interrupted(self, outcome: tuple[bool, str]) -> None:
        """A cleanup failure the result cannot report, because the run was cancelled."""
        passed, detail = outcome
        if not passed:
            log.warning("probe %s: cleanup after an interrupted run failed: %s", self.settings.name, detail)

    async def _cleanup(self, message_sid: str, timer: PhaseTimer | None, gone_is_fine: bool = False) -> tuple[bool, str]:
        """The cleanup request, bounded by `cleanup_timeout`: (passed, "HTTP 204" or what went wrong). With
        `gone_is_fine` (a leftover), a 404 passes whatever `expect_status` says."""
        cleanup = self.settings.cleanup
        assert cleanup is not None
        url = cleanup.url.format(message_sid=message_sid)
        try:
            with timer.phase("cleanup") if timer is not None else nullcontext():
                async with asyncio.timeout(self.settings.cleanup_timeout):
                    session = self._sessions.get()
                    async with session.request(cleanup.method, url, headers=self._headers, allow_redirects=False) as response:
                        await read_limited(response, self.settings.max_body_bytes)
                        status = response.status
        except aiohttp.ClientError as exc:
            return False, f"cleanup {cleanup.method} failed: {client_error_result(exc).message}"
        except TimeoutError:
            return False, (f"cleanup {cleanup.method} got no answer within cleanup_timeout "
                           f"{format_duration(self.settings.cleanup_timeout)}")
        if status_matches(status, cleanup.expect_status) or (gone_is_fine and status == 404):
            return True, f"HTTP {status}"
        return False, f"cleanup {cleanup.method} answered HTTP {status}, expected {_shown(cleanup.expect_status)}"


def _with_cleanup(result: Result, passed: bool, detail: str) -> Result:
    """The checks' result with the cleanup's outcome: a failed cleanup is `cleanup` only if the checks had passed."""
    checks = (*result.checks, Check(passed, f"[CLEANUP] {detail}"))
    if passed:
        return replace(result, checks=checks)
    if result.success:
        return Result.fail("cleanup", f"{result.message}, but {detail}", checks=checks)
    return Result.fail(result.reason, f"{result.message}; also {detail}", checks=checks)


def _in_phase(what: str, failure: Result, checks: tuple[Check, ...] = ()) -> Result:
    return Result.fail(failure.reason, f"{what}: {failure.message}", checks=checks)


def _twiml_problem(body: bytes) -> str | None:
    """Why the body is not a TwiML document, or None when it is one (an empty <Response/> is one)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        return f"not well-formed XML ({exc})"
    if root.tag != "Response":
        return f"root element is <{root.tag[:40]}>, expected <Response>"
    return None
