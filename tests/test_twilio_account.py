"""The `twilio` probe: the real twilio SDK (async client) against the sandbox's Twilio API stand-in and small servers."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from pydantic import ValidationError

from canary.config import load_config
from canary.contract import Gauge, Result
from canary.runner import run_once
from canary.sandbox import build_sandbox_app
from canary.sandbox.twilio_api import DEFAULT_ACCOUNT_SID
from canary.sandbox.whatsapp import DEFAULT_AUTH_TOKEN
from canary.scrub import Scrubber
from probes import PROBE_TYPES
from probes.twilio_account import TwilioAccountProbe, TwilioSettings
from tests.conftest import free_port, start_app, wait_until, write_config

SHORT_TIMEOUT = 0.5
OTHER_SID = "AC" + "1" * 32

Sandbox = Callable[..., Awaitable[tuple[web.AppRunner, str]]]


@pytest.fixture
async def sandbox_api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Sandbox]:
    """Starts sandboxes whose Twilio stand-in reads the given credentials from the environment."""
    runners: list[web.AppRunner] = []

    async def _start(sid: str | None = None, token: str | None = None) -> tuple[web.AppRunner, str]:
        for name, value in (("TWILIO_ACCOUNT_SID", sid), ("TWILIO_AUTH_TOKEN", token)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        runner, base = await start_app(build_sandbox_app())
        runners.append(runner)
        return runner, base

    try:
        yield _start
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def set_faults(base: str, **faults: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/_sandbox/faults", json=faults) as response:
            assert response.status == 200, await response.text()


def settings_for(base: str, **fields: Any) -> TwilioSettings:
    return TwilioSettings.model_validate({
        "name": "twilio-account", "type": "twilio", "channel": "whatsapp", "interval": "60s", "timeout": "5s",
        "account_sid": DEFAULT_ACCOUNT_SID, "auth_token": DEFAULT_AUTH_TOKEN, "api_url": base, **fields,
    })


async def probe_once(base: str, timeout: float = 3.0, **fields: Any) -> Result:
    settings = settings_for(base, **fields)
    probe = TwilioAccountProbe(settings)
    try:
        return await run_once(probe, timeout, Scrubber(settings.secret_values()))
    finally:
        await probe.close()


def active_gauge(result: Result) -> list[float]:
    return [gauge.value for gauge in result.gauges if gauge.name == "twilio_account_active"]


# --- healthy and account states -----------------------------------------------------------------------------------


async def test_active_account_passes_with_the_gauge_at_one(sandbox_api: Sandbox) -> None:
    _, base = await sandbox_api()
    result = await probe_once(f"{base}/twilio")

    assert result.success and result.reason == "ok", result.message
    assert result.message == "the Twilio account is active"
    assert result.gauges == (
        Gauge("twilio_account_active", 1.0, "Whether the Twilio account's status is active (1) or suspended/closed (0)."),
    )
    assert result.phases["fetch"] > 0


@pytest.mark.parametrize("status", ["suspended", "closed"])
async def test_suspended_or_closed_account_fails_as_assertion(sandbox_api: Sandbox, status: str) -> None:
    _, base = await sandbox_api()
    await set_faults(base, twilio_account=status)
    result = await probe_once(f"{base}/twilio")

    assert result.reason == "assertion"
    assert result.message == f"the Twilio account is '{status}', expected 'active'"
    assert active_gauge(result) == [0.0]


@pytest.mark.parametrize(
    ("fault", "reason", "message"),
    [
        ("unauthorized", "auth", "Twilio refused the account SID and auth token with HTTP 401 (Twilio error 20003: Authenticate)"),
        ("error", "status", "fetching the account failed: HTTP 500 (Twilio error 20500: An internal server error has occurred)"),
    ],
)
async def test_api_faults_fail_with_their_reason(sandbox_api: Sandbox, fault: str, reason: str, message: str) -> None:
    _, base = await sandbox_api()
    await set_faults(base, twilio_account=fault)
    result = await probe_once(f"{base}/twilio")

    assert result.reason == reason
    assert result.message.startswith(message), result.message
    assert active_gauge(result) == []  # the status is unknown, not inactive


async def test_rotated_token_fails_as_auth(sandbox_api: Sandbox) -> None:
    _, base = await sandbox_api(token="the-token-after-rotation")
    result = await probe_once(f"{base}/twilio")

    assert result.reason == "auth"
    assert "20003" in result.message and "rotated or revoked" in result.message


async def test_stand_in_speaks_twilios_wire_format(sandbox_api: Sandbox) -> None:
    _, base = await sandbox_api()
    url = f"{base}/twilio/2010-04-01/Accounts/{{sid}}.json"
    good = {"Authorization": aiohttp.encode_basic_auth(DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN)}
    bad = {"Authorization": aiohttp.encode_basic_auth(DEFAULT_ACCOUNT_SID, "not-the-token")}
    async with aiohttp.ClientSession() as session:
        async with session.get(url.format(sid=DEFAULT_ACCOUNT_SID), headers=good) as response:
            account = await response.json()
            assert response.status == 200 and response.headers["Twilio-Request-Id"].startswith("RQ")
        async with session.get(url.format(sid=DEFAULT_ACCOUNT_SID), headers=bad) as response:
            refused = await response.json()
            assert response.status == 401 and response.headers["WWW-Authenticate"] == 'Basic realm="Twilio API"'
        async with session.get(url.format(sid=OTHER_SID), headers=good) as response:
            missing = await response.json()
            assert response.status == 404

    assert set(account) == {"auth_token", "date_created", "date_updated", "friendly_name", "owner_account_sid", "sid",
                            "status", "subresource_uris", "type", "uri"}
    assert (account["sid"], account["status"], account["type"]) == (DEFAULT_ACCOUNT_SID, "active", "Full")
    assert account["uri"] == f"/2010-04-01/Accounts/{DEFAULT_ACCOUNT_SID}.json"
    assert account["subresource_uris"]["messages"] == f"/2010-04-01/Accounts/{DEFAULT_ACCOUNT_SID}/Messages.json"
    assert refused == {"code": 20003, "message": "Authenticate", "more_info": "https://www.twilio.com/docs/errors/20003",
                       "status": 401}
    assert missing == {"code": 20404, "message": f"The requested resource /2010-04-01/Accounts/{OTHER_SID}.json was not found",
                       "more_info": "https://www.twilio.com/docs/errors/20404", "status": 404}


async def test_hanging_api_times_out_during_fetch(sandbox_api: Sandbox) -> None:
    _, base = await sandbox_api()
    await set_faults(base, twilio_account="hang")
    started = asyncio.get_running_loop().time()
    result = await probe_once(f"{base}/twilio", timeout=SHORT_TIMEOUT)

    assert result.reason == "timeout"
    assert result.message == "no answer within 500ms during fetch"
    assert asyncio.get_running_loop().time() - started < 3.0


async def test_refused_connection_fails_as_connect() -> None:
    result = await probe_once(f"http://127.0.0.1:{free_port()}/twilio")

    assert result.reason == "connect"
    assert result.message.startswith("cannot connect")


async def test_session_is_closed_after_each_run(sandbox_api: Sandbox) -> None:
    runner, base = await sandbox_api()
    settings = settings_for(f"{base}/twilio")
    probe = TwilioAccountProbe(settings)
    for _ in range(2):
        result = await run_once(probe, 3.0, Scrubber())
        assert result.success, result.message
        # The SDK's session keeps connections alive; closing it after the run drops them on the server too.
        await wait_until(lambda: not runner.server.connections, timeout=3.0)  # type: ignore[union-attr]
    await probe.close()


async def test_sdk_region_and_edge_variables_do_not_move_the_api_url(
    sandbox_api: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, base = await sandbox_api()
    monkeypatch.setenv("TWILIO_REGION", "au1")
    monkeypatch.setenv("TWILIO_EDGE", "sydney")
    result = await probe_once(f"{base}/twilio/")

    assert result.success, result.message


# --- answers the stand-in does not give ---------------------------------------------------------------------------

ANSWER = web.AppKey("answer", dict)


async def _account_answer(request: web.Request) -> web.Response:
    answer = request.app[ANSWER]
    return web.Response(status=answer["status"], text=answer["body"], content_type="application/json")


@pytest.fixture
async def fake_api() -> AsyncIterator[tuple[web.Application, str]]:
    app = web.Application()
    app[ANSWER] = {}
    app.router.add_get("/2010-04-01/Accounts/{sid}.json", _account_answer)
    runner, base = await start_app(app)
    try:
        yield app, base
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("status", "body", "reason", "message"),
    [
        (200, "<html>maintenance</html>", "assertion", "Twilio answered, but not with an account: JSONDecodeError"),
        (200, '{"sid": "AC00"}', "assertion", "the account JSON has no status (got null)"),
        (404, '{"code": 20404, "message": "The requested resource /2010-04-01/Accounts/AC1.json was not found", '
              '"more_info": "https://www.twilio.com/docs/errors/20404", "status": 404}',
         "status", "Twilio does not know the account: HTTP 404 (Twilio error 20404"),
        (429, '{"code": 20429, "message": "Too Many Requests", "more_info": "https://www.twilio.com/docs/errors/20429", '
              '"status": 429}', "rate_limited", "Twilio is rate limiting the account: HTTP 429 (Twilio error 20429"),
        (503, "Service Unavailable", "status", "fetching the account failed: HTTP 503 (Twilio error 503"),
        (403, '{"type": "https://www.twilio.com/docs/errors/20003", "title": "Permission Denied", "status": 403, '
              '"code": 20003}', "auth", "Twilio refused the account SID and auth token with HTTP 403 (Twilio error 20003: Permission Denied)"),
    ],
)
async def test_other_answers(fake_api: tuple[web.Application, str], status: int, body: str, reason: str, message: str) -> None:
    app, base = fake_api
    app[ANSWER].update(status=status, body=body)
    result = await probe_once(base)

    assert result.reason == reason
    assert result.message.startswith(message), result.message


# --- settings and config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"account_sid": "SK" + "0" * 32}, "must be a Twilio account SID: 'AC' and 32 hexadecimal digits"),
        ({"api_url": "api.twilio.com"}, "must be an absolute http:// or https:// URL"),
        ({"api_url": "https://api.twilio.com/?x=1"}, "must be a base URL without a query string"),
        ({"region": "au1"}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_settings_are_refused_at_load(fields: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(error)):
        settings_for("https://api.twilio.com", **fields)


def test_config_loads_the_probe_with_its_channel(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        [[probes]]
        name = "twilio-account"
        type = "twilio"
        channel = "whatsapp"
        account_sid = "${TWILIO_ACCOUNT_SID:-AC00000000000000000000000000000000}"
        auth_token = "${TWILIO_AUTH_TOKEN:-sandbox-twilio-auth-token}"
        api_url = "${TWILIO_API_URL:-http://127.0.0.1:8000/twilio}"
    """)
    config = load_config(path, PROBE_TYPES, environ={"TWILIO_AUTH_TOKEN": "live-token-abc123"})

    [settings] = config.probes
    assert isinstance(settings, TwilioSettings) and settings.channel == "whatsapp"
    assert settings.api_url == "http://127.0.0.1:8000/twilio"
    assert settings.account_sid == DEFAULT_ACCOUNT_SID
    assert "live-token-abc123" in config.secrets
    assert settings.target() == "twilio http://127.0.0.1:8000/twilio"  # no account SID where targets are shown


# --- secrets ------------------------------------------------------------------------------------------------------


async def test_no_auth_token_in_messages_or_logs(sandbox_api: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    # The account JSON itself carries the auth token (as Twilio's does); it must go nowhere.
    token = "tok-5a4b3c2d1e0f99887766"
    _, base = await sandbox_api(token=token)
    caplog.set_level(logging.DEBUG)
    results = []
    for fault in ("active", "suspended", "unauthorized", "error"):
        await set_faults(base, twilio_account=fault)
        results.append(await probe_once(f"{base}/twilio", auth_token=token))
    await set_faults(base, twilio_account="active")
    results.append(await probe_once(f"{base}/twilio", auth_token="a-stale-token-000111"))

    assert [r.reason for r in results] == ["ok", "assertion", "auth", "status", "auth"]
    texts = [r.message for r in results] + [c.text for r in results for c in r.checks] + [caplog.text]
    for secret in (token, "a-stale-token-000111"):
        assert not any(secret in text for text in texts), secret
