"""`twilio` probe: the Twilio account the WhatsApp channel sends through still authenticates and is `active`.

It fetches `/2010-04-01/Accounts/{sid}.json` with the twilio SDK and its aiohttp-based client, so the request is
exactly the one the platform's own Twilio calls make. A refused login (rotated token, or an account Twilio has
shut) is `auth`; a suspended or closed account is `assertion`. `canary_probe_twilio_account_active` is 1 or 0
whenever the account's status was read.
"""

from __future__ import annotations

import json
import logging
from typing import Literal

import aiohttp
from pydantic import SecretStr, field_validator
from yarl import URL

from canary.contract import Gauge, PhaseTimer, Probe, ProbeSettings, Result, spelled
from probes.transport import client_error_result, http_url

_ACTIVE = "active"
_GAUGE_HELP = "Whether the Twilio account's status is active (1) or suspended/closed (0)."
# The SDK logs every request and response at INFO; keep that out of the daemon's log.
_SDK_LOGGER = logging.getLogger("canary.probes.twilio")
_SDK_LOGGER.setLevel(logging.WARNING)


AccountSid = spelled(r"AC[0-9a-fA-F]{32}", "a Twilio account SID: 'AC' and 32 hexadecimal digits")


class TwilioSettings(ProbeSettings):
    type: Literal["twilio"] = "twilio"
    account_sid: AccountSid
    auth_token: SecretStr
    api_url: str = "https://api.twilio.com"

    @field_validator("api_url")
    @classmethod
    def _valid_url(cls, url: str) -> str:
        if URL(http_url(url)).query_string:
            raise ValueError("must be a base URL without a query string")
        return http_url(url.rstrip("/"))

    def target(self) -> str:
        # Not the account SID: targets are shown on the status page, and the SID identifies the account.
        return f"twilio {self.api_url.for_humans()}"  # type: ignore[attr-defined]


class TwilioAccountProbe(Probe[TwilioSettings]):
    settings_model = TwilioSettings
    reasons = ("status", "tls", "dns", "connect", "body", "auth", "assertion", "rate_limited")
    libraries = ("twilio.rest", "twilio.http.async_http_client")

    async def run(self, timer: PhaseTimer) -> Result:
        from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
        from twilio.http.async_http_client import AsyncTwilioHttpClient
        from twilio.rest import Client

        settings = self.settings
        http_client = AsyncTwilioHttpClient(logger=_SDK_LOGGER)  # its aiohttp session lives for this run only
        try:
            # A non-empty environment keeps the SDK from reading TWILIO_EDGE/TWILIO_REGION from the process and
            # rewriting the host of a configured api_url.
            client = Client(settings.account_sid, settings.auth_token.get_secret_value(), http_client=http_client,
                            environment={"TWILIO_ACCOUNT_SID": settings.account_sid})
            client.api.base_url = settings.api_url  # the SDK's per-domain base URL (https://api.twilio.com)
            with timer.phase("fetch"):
                account = await client.api.v2010.accounts(settings.account_sid).fetch_async()
        except TwilioRestException as exc:
            return _refused(exc.status, exc.code, exc.msg)
        except TwilioServiceException as exc:
            return _refused(exc.status, exc.code, exc.title)
        except aiohttp.ClientError as exc:
            return client_error_result(exc)
        except (ValueError, TwilioException) as exc:  # a 2xx whose body is not the account JSON
            return Result.fail("assertion", f"Twilio answered, but not with an account: {type(exc).__name__}")
        finally:
            await http_client.close()
        return _judge(account.status)


def _refused(status: int, code: object, message: str) -> Result:
    what = f"HTTP {status} (Twilio error {code}: {str(message).removeprefix('Unable to fetch record: ')[:120]})"
    if status in (401, 403):
        return Result.fail(
            "auth",
            f"Twilio refused the account SID and auth token with {what}; the token was rotated or revoked, "
            "or the account is suspended or closed",
        )
    if status == 429:
        return Result.fail("rate_limited", f"Twilio is rate limiting the account: {what}")
    if status == 404:
        return Result.fail("status", f"Twilio does not know the account: {what}; check account_sid")
    return Result.fail("status", f"fetching the account failed: {what}")


def _judge(status: object) -> Result:
    if not isinstance(status, str):
        return Result.fail("assertion", f"the account JSON has no status (got {json.dumps(status)[:40]})")
    gauge = Gauge("twilio_account_active", 1.0 if status == _ACTIVE else 0.0, _GAUGE_HELP)
    if status != _ACTIVE:
        return Result.fail("assertion", f"the Twilio account is {status[:20]!r}, expected 'active'", gauges=(gauge,))
    return Result.ok("the Twilio account is active", gauges=(gauge,))
