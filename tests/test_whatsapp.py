"""The `whatsapp` probe against the sandbox's real webhook (twilio's RequestValidator) and small recording servers."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from pydantic import ValidationError
from twilio.request_validator import RequestValidator

from canary.config import load_config
from canary.contract import Result
from canary.ledger import FILE_NAME as LEDGER_FILE, Ledger, building_with
from canary.runner import run_once
from canary.sandbox import build_sandbox_app
from canary.sandbox.whatsapp import DEFAULT_AUTH_TOKEN
from canary.scrub import Scrubber
from probes import PROBE_TYPES, build_probe
from probes.whatsapp import WhatsAppProbe, WhatsAppSettings
from tests.conftest import free_port, start_app, wait_until, write_config

ACCOUNT_SID = "AC" + "0" * 32
CANARY_NUMBER = "+15005550006"
PLATFORM_NUMBER = "+14155238886"
PUBLIC_BASE = "https://support.example.com"
SHORT_TIMEOUT = 0.5
MESSAGE_SID = re.compile(r"^SM[0-9a-f]{32}$")
TWILIO_FIELDS = {
    "SmsMessageSid", "NumMedia", "ProfileName", "MessageType", "SmsSid", "WaId", "SmsStatus", "Body", "To",
    "NumSegments", "ReferralNumMedia", "MessageSid", "AccountSid", "From", "ApiVersion",
}


# --- servers ------------------------------------------------------------------------------------------------------

Sandbox = Callable[..., Awaitable[str]]


@pytest.fixture
async def platform(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Sandbox]:
    """Starts sandboxes whose webhook reads the given environment (as `probe sandbox` would at start)."""
    runners: list[web.AppRunner] = []

    async def _start(token: str | None = None, public_url: str | None = None) -> str:
        for name, value in (("TWILIO_AUTH_TOKEN", token), ("PLATFORM_PUBLIC_URL", public_url)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        runner, base = await start_app(build_sandbox_app())
        runners.append(runner)
        return base

    try:
        yield _start
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def set_faults(base: str, **faults: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/_sandbox/faults", json=faults) as response:
            assert response.status == 200, await response.text()


async def inbox(base: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/_sandbox/whatsapp/messages") as response:
            return await response.json()


RECEIVED = web.AppKey("received", list)
BEHAVIOUR = web.AppKey("behaviour", dict)


async def _recording_webhook(request: web.Request) -> web.Response:
    """Checks the signature as the platform would (URL as received) and records everything it was sent."""
    form = await request.post()
    behaviour = request.app[BEHAVIOUR]
    signature = request.headers.get("X-Twilio-Signature", "")
    valid = RequestValidator(DEFAULT_AUTH_TOKEN).validate(str(request.url), form, signature)
    request.app[RECEIVED].append(
        {"form": dict(form), "headers": dict(request.headers), "valid": valid, "content_type": request.content_type}
    )
    if (on_request := behaviour.get("on_request")) is not None:  # a test looks at the world as the request arrives
        on_request(request.app[RECEIVED][-1])
    if not valid:
        status = behaviour.get("forged_status", 403)
        if "X-Twilio-Signature" not in request.headers:
            status = behaviour.get("unsigned_status", status)
        return web.Response(status=status, text="Forbidden")
    return web.Response(status=behaviour.get("status", 200), text=behaviour.get("body", "<Response/>"),
                        content_type="application/xml")


async def _cleanup_endpoint(request: web.Request) -> web.Response:
    behaviour = request.app[BEHAVIOUR]
    behaviour["cleanups_started"] = behaviour.get("cleanups_started", 0) + 1
    # Cancelled, recording nothing, when the client gives up first (the recorder drops such requests).
    await asyncio.sleep(behaviour.get("cleanup_seconds", 0.0))
    request.app[RECEIVED].append({"cleanup": request.match_info["sid"], "method": request.method,
                                  "headers": dict(request.headers)})
    return web.Response(status=behaviour.get("cleanup_status", 204))


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[web.Application, str]]:
    app = web.Application()
    app[RECEIVED] = []
    app[BEHAVIOUR] = {}
    app.router.add_post("/whatsapp/webhook", _recording_webhook)
    app.router.add_route("*", "/cleanup/{sid}", _cleanup_endpoint)
    runner, base = await start_app(app, handler_cancellation=True)
    try:
        yield app, base
    finally:
        await runner.cleanup()


# --- helpers ------------------------------------------------------------------------------------------------------


def settings_for(base: str, **fields: Any) -> WhatsAppSettings:
    return WhatsAppSettings.model_validate({
        "name": "whatsapp-inbound", "type": "whatsapp", "channel": "whatsapp", "interval": "30s", "timeout": "5s",
        "url": f"{base}/whatsapp/webhook", "auth_token": DEFAULT_AUTH_TOKEN, "account_sid": ACCOUNT_SID,
        "from_number": CANARY_NUMBER, "to_number": f"whatsapp:{PLATFORM_NUMBER}", **fields,
    })


async def probe_once(base: str, timeout: float = 3.0, runs: int = 1, **fields: Any) -> list[Result]:
    settings = settings_for(base, **fields)
    probe = WhatsAppProbe(settings)
    try:
        return [await run_once(probe, timeout, Scrubber(settings.secret_values())) for _ in range(runs)]
    finally:
        await probe.close()


def check_texts(result: Result) -> list[tuple[bool, str]]:
    return [(check.passed, check.text) for check in result.checks]


# --- healthy ------------------------------------------------------------------------------------------------------


async def test_healthy_platform_accepts_the_signed_message_and_refuses_forged_and_unsigned(platform: Sandbox) -> None:
    base = await platform()
    [result] = await probe_once(base)

    assert result.success and result.reason == "ok", result.message
    assert result.message == ("signed webhook answered HTTP 200 with TwiML; forged signature refused with HTTP 403; "
                              "unsigned request refused with HTTP 403")
    assert check_texts(result) == [
        (True, "[SIGNED] HTTP 200"), (True, "[TWIML] <Response> document"), (True, "[FORGED] HTTP 403 in (403)"),
        (True, "[UNSIGNED] HTTP 403 in (403)"),
    ]
    assert result.phases["signed"] > 0 and result.phases["forged"] > 0 and result.phases["unsigned"] > 0
    seen = await inbox(base)
    [message] = seen["messages"]
    assert message["signature_valid"] and message["synthetic"]
    assert message["body"] == "[canary] synthetic check"
    assert (message["from"], message["to"]) == (f"whatsapp:{CANARY_NUMBER}", f"whatsapp:{PLATFORM_NUMBER}")
    assert seen["refused"] == [{"message_sid": message["message_sid"], "signature_valid": False}] * 2
    assert seen["conversations"] == []  # a synthetic message leaves nothing behind


async def test_sends_the_form_twilio_sends_signed_over_the_url(recorder: tuple[web.Application, str]) -> None:
    app, base = recorder
    [result] = await probe_once(base, body="[canary] hello from the probe", profile_name="Canary Bot")

    assert result.success, result.message
    signed, forged, unsigned = app[RECEIVED]
    form = signed["form"]
    assert set(form) == TWILIO_FIELDS
    assert signed["content_type"] == "application/x-www-form-urlencoded"
    assert MESSAGE_SID.match(form["MessageSid"]) and form["SmsSid"] == form["SmsMessageSid"] == form["MessageSid"]
    assert form["From"] == f"whatsapp:{CANARY_NUMBER}" and form["To"] == f"whatsapp:{PLATFORM_NUMBER}"
    assert form["WaId"] == CANARY_NUMBER.removeprefix("+")
    assert (form["AccountSid"], form["ApiVersion"], form["NumMedia"], form["NumSegments"]) == (ACCOUNT_SID, "2010-04-01", "0", "1")
    assert (form["Body"], form["ProfileName"], form["SmsStatus"]) == ("[canary] hello from the probe", "Canary Bot", "received")
    assert signed["valid"]
    assert signed["headers"]["X-Synthetic-Canary"] == "1"
    assert signed["headers"]["User-Agent"] == "TwilioProxy/1.1"
    # The negative check repeats the very same message, only the signature is wrong.
    assert forged["form"] == form and not forged["valid"]
    assert forged["headers"]["X-Twilio-Signature"] != signed["headers"]["X-Twilio-Signature"]
    assert unsigned["form"] == form and "X-Twilio-Signature" not in unsigned["headers"]
    assert unsigned["headers"]["X-Synthetic-Canary"] == "1"


async def test_every_run_sends_a_fresh_message_sid(recorder: tuple[web.Application, str]) -> None:
    app, base = recorder
    results = await probe_once(base, runs=3)

    assert all(result.success for result in results), [r.message for r in results]
    sids = [entry["form"]["MessageSid"] for entry in app[RECEIVED]]
    assert len(sids) == 9
    assert all(len(set(sids[run:run + 3])) == 1 for run in (0, 3, 6))  # signed, forged, unsigned share one
    assert len({sids[0], sids[3], sids[6]}) == 3
    assert all(MESSAGE_SID.match(sid) for sid in sids)


async def test_synthetic_header_and_extra_headers_are_configurable(recorder: tuple[web.Application, str]) -> None:
    app, base = recorder
    [result] = await probe_once(base, synthetic_header="X-Canary: whatsapp", headers={"X-Env": "staging"})

    assert result.success, result.message
    headers = app[RECEIVED][0]["headers"]
    assert headers["X-Canary"] == "whatsapp" and headers["X-Env"] == "staging"
    assert "X-Synthetic-Canary" not in headers


# --- faults -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "reason", "message"),
    [
        ("error", "status", "signed webhook answered HTTP 500, expected 2xx"),
        ("reject_all", "auth", "the platform refused a correctly signed webhook with HTTP 403"),
        ("skip_validation", "insecure", "the platform accepted a webhook with a forged X-Twilio-Signature (HTTP 200)"),
        ("accept_unsigned", "insecure", "the platform accepts unsigned webhooks: a request without X-Twilio-Signature "
                                        "was answered HTTP 200"),
        ("bad_twiml", "assertion", "signed webhook answered HTTP 200 but not with TwiML: not well-formed XML"),
    ],
)
async def test_each_webhook_fault_fails_with_its_reason(platform: Sandbox, fault: str, reason: str, message: str) -> None:
    base = await platform()
    await set_faults(base, whatsapp_webhook=fault)
    [result] = await probe_once(base)

    assert not result.success and result.reason == reason
    assert result.message.startswith(message), result.message


async def test_platform_that_skips_validation_is_caught_by_the_forged_check(platform: Sandbox) -> None:
    base = await platform()
    await set_faults(base, whatsapp_webhook="skip_validation")
    [result] = await probe_once(base)

    assert result.reason == "insecure"
    assert "must refuse it with 403" in result.message
    assert check_texts(result)[-1] == (False, "[FORGED] HTTP 200 in (403)")
    seen = await inbox(base)
    assert [m["signature_valid"] for m in seen["messages"]] == [True, False]  # the forgery got in
    assert seen["refused"] == []


async def test_platform_that_accepts_unsigned_webhooks_is_caught_by_the_unsigned_check(platform: Sandbox) -> None:
    base = await platform()
    await set_faults(base, whatsapp_webhook="accept_unsigned")
    [result] = await probe_once(base)

    assert result.reason == "insecure"
    assert result.message.endswith("it must refuse it with 403: anyone can post messages as Twilio")
    assert check_texts(result)[-2:] == [(True, "[FORGED] HTTP 403 in (403)"), (False, "[UNSIGNED] HTTP 200 in (403)")]
    seen = await inbox(base)
    assert [m["signature_valid"] for m in seen["messages"]] == [True, False]  # the unsigned one got in
    assert [r["signature_valid"] for r in seen["refused"]] == [False]  # the forged one did not


async def test_unsigned_refused_with_another_status_fails_unless_expected(recorder: tuple[web.Application, str]) -> None:
    app, base = recorder
    app[BEHAVIOUR]["unsigned_status"] = 400
    [default] = await probe_once(base)
    [configured] = await probe_once(base, expect_forged_status=[400, 403])

    assert default.reason == "status"
    assert default.message == "unsigned webhook answered HTTP 400, expected 403"
    assert configured.success, configured.message
    assert check_texts(configured)[-1] == (True, "[UNSIGNED] HTTP 400 in (400, 403)")


@pytest.mark.parametrize("fault", ["skip_validation", "accept_unsigned"])
async def test_without_the_forged_check_an_insecure_platform_passes(platform: Sandbox, fault: str) -> None:
    base = await platform()
    await set_faults(base, whatsapp_webhook=fault)
    [result] = await probe_once(base, check_forged=False)

    assert result.success, result.message
    assert "forged" not in result.phases and "unsigned" not in result.phases
    assert len((await inbox(base))["messages"]) == 1


async def test_hanging_webhook_times_out_during_signed(platform: Sandbox) -> None:
    base = await platform()
    await set_faults(base, whatsapp_webhook="hang")
    started = asyncio.get_running_loop().time()
    [result] = await probe_once(base, timeout=SHORT_TIMEOUT)

    assert result.reason == "timeout"
    assert result.message == "no answer within 500ms during signed"
    assert asyncio.get_running_loop().time() - started < 3.0


async def test_rotated_token_fails_as_auth(platform: Sandbox) -> None:
    base = await platform(token="the-token-after-rotation")
    [result] = await probe_once(base)

    assert result.reason == "auth"
    assert check_texts(result) == [(False, "[SIGNED] HTTP 403 in (2xx)")]
    assert "forged" not in result.phases  # nothing to compare against once the real one is refused


async def test_forged_refused_with_another_status_fails_unless_expected(recorder: tuple[web.Application, str]) -> None:
    app, base = recorder
    app[BEHAVIOUR]["forged_status"] = 401
    [default] = await probe_once(base)
    [configured] = await probe_once(base, expect_forged_status=[401, 403])
    [by_class] = await probe_once(base, expect_forged_status=["4xx"])

    assert default.reason == "status"
    assert default.message == "forged webhook answered HTTP 401, expected 403"
    assert configured.success, configured.message
    assert check_texts(configured)[-2:] == [(True, "[FORGED] HTTP 401 in (401, 403)"),
                                            (True, "[UNSIGNED] HTTP 401 in (401, 403)")]
    assert by_class.success, by_class.message


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("", "not well-formed XML"),
        ("<html><body>OK</body></html>", "root element is <html>, expected <Response>"),
        ('{"ok": true}', "not well-formed XML"),
    ],
)
async def test_answer_that_is_not_twiml_fails_as_assertion(
    recorder: tuple[web.Application, str], body: str, problem: str
) -> None:
    app, base = recorder
    app[BEHAVIOUR]["body"] = body
    [result] = await probe_once(base)

    assert result.reason == "assertion"
    assert problem in result.message
    assert check_texts(result)[0] == (True, "[SIGNED] HTTP 200")


async def test_answer_larger_than_max_body_bytes_fails_as_body(recorder: tuple[web.Application, str]) -> None:
    app, base = recorder
    app[BEHAVIOUR]["body"] = "<Response>" + "<Message>x</Message>" * 100 + "</Response>"
    [result] = await probe_once(base, max_body_bytes=512)

    assert result.reason == "body"
    assert result.message.startswith("signed webhook: body of ") and "max_body_bytes (512)" in result.message


async def test_twiml_with_a_reply_passes(recorder: tuple[web.Application, str]) -> None:
    app, base = recorder
    app[BEHAVIOUR]["body"] = '<?xml version="1.0" encoding="UTF-8"?><Response><Message>Hi!</Message></Response>'
    [result] = await probe_once(base)

    assert result.success, result.message


async def test_refused_connection_fails_as_connect() -> None:
    [result] = await probe_once(f"http://127.0.0.1:{free_port()}")

    assert result.reason == "connect"
    assert result.message.startswith("signed webhook: cannot connect")


# --- the public URL -----------------------------------------------------------------------------------------------


async def test_signature_covers_the_public_url_of_a_platform_behind_a_proxy(platform: Sandbox) -> None:
    base = await platform(public_url=PUBLIC_BASE)
    [direct] = await probe_once(base)
    [public] = await probe_once(base, public_url=f"{PUBLIC_BASE}/whatsapp/webhook")
    [public_base] = await probe_once(base, public_url=PUBLIC_BASE + "/")
    [other] = await probe_once(base, public_url="https://other.example.com/whatsapp/webhook")

    assert direct.reason == "auth" and other.reason == "auth"
    assert "another public URL" in direct.message
    assert public.success, public.message
    assert public_base.success, public_base.message
    seen = await inbox(base)
    assert len(seen["messages"]) == 2 and all(m["signature_valid"] for m in seen["messages"])


@pytest.mark.parametrize(
    ("url", "public_url", "signed"),
    [
        ("http://10.0.0.5:8000/whatsapp/webhook", None, "http://10.0.0.5:8000/whatsapp/webhook"),
        ("http://10.0.0.5:8000/whatsapp/webhook", "", "http://10.0.0.5:8000/whatsapp/webhook"),
        ("http://10.0.0.5:8000/whatsapp/webhook", "https://support.example.com",
         "https://support.example.com/whatsapp/webhook"),
        ("http://10.0.0.5:8000/whatsapp/webhook?tenant=7", "https://support.example.com/",
         "https://support.example.com/whatsapp/webhook?tenant=7"),
        ("http://10.0.0.5:8000/whatsapp/webhook", "https://abc.ngrok.app/hooks/wa", "https://abc.ngrok.app/hooks/wa"),
    ],
)
def test_public_url_is_a_full_url_or_a_base_taking_the_url_path(url: str, public_url: str | None, signed: str) -> None:
    assert settings_for("http://unused", url=url, public_url=public_url).signed_url() == signed


# --- cleanup ------------------------------------------------------------------------------------------------------


async def test_cleanup_runs_after_the_checks_with_the_message_sid(recorder: tuple[web.Application, str]) -> None:
    app, base = recorder
    [result] = await probe_once(base, cleanup={"url": base + "/cleanup/{message_sid}"})

    assert result.success, result.message
    signed, forged, unsigned, cleanup = app[RECEIVED]
    assert cleanup["cleanup"] == signed["form"]["MessageSid"] and cleanup["method"] == "DELETE"
    assert cleanup["headers"]["X-Synthetic-Canary"] == "1"
    assert "X-Twilio-Signature" not in cleanup["headers"]
    assert result.phases["cleanup"] > 0
    assert check_texts(result)[-1] == (True, "[CLEANUP] HTTP 204")


async def test_the_ledger_holds_each_message_from_before_it_is_sent_until_its_cleanup_removed_it(
    recorder: tuple[web.Application, str], tmp_path: Path
) -> None:
    """A process killed after the webhook went out (even before its answer) leaves a ledger entry, so the message
    is removed after a restart; a refused cleanup leaves the entry for the janitor, whose retry treats 404 as gone."""
    app, base = recorder
    ledger = Ledger.in_directory(tmp_path)
    settings = settings_for(base, cleanup={"url": base + "/cleanup/{message_sid}"})
    probe = building_with(ledger, build_probe)(settings)

    def look_at_the_ledger(received: dict[str, Any]) -> None:
        with sqlite3.connect(tmp_path / LEDGER_FILE) as db:
            received["ledger"] = [json.loads(row[0]) for row in db.execute("SELECT variables FROM objects")]

    app[BEHAVIOUR].update({"on_request": look_at_the_ledger, "cleanup_status": 500})
    failed = await run_once(probe, 3.0, Scrubber(settings.secret_values()))
    assert failed.reason == "cleanup", failed.message
    signed = app[RECEIVED][0]
    sid = signed["form"]["MessageSid"]
    assert signed["ledger"] == [{"message_sid": sid}]  # on disk before the platform saw the message
    [entry] = ledger.entries()
    assert entry.variables == {"message_sid": sid}

    app[BEHAVIOUR].update({"on_request": None, "cleanup_status": 404})  # the platform removed it in the meantime
    assert await probe.remove_leftover(entry.variables) is None
    assert app[RECEIVED][-1]["cleanup"] == sid
    sent = len(app[RECEIVED])
    assert await probe.remove_leftover({"message_sid": "../admin"}) == "the ledger entry holds no message SID"
    assert len(app[RECEIVED]) == sent  # nothing from a doubtful entry reaches a URL

    app[BEHAVIOUR]["cleanup_status"] = 204
    passed = await run_once(probe, 3.0, Scrubber(settings.secret_values()))
    assert passed.success, passed.message
    assert [e.run_id for e in ledger.entries()] == [entry.run_id]  # the passing run's entry went with its cleanup
    await probe.close()
    await ledger.close()


async def test_failed_cleanup_after_passing_checks_fails_as_cleanup(recorder: tuple[web.Application, str]) -> None:
    app, base = recorder
    app[BEHAVIOUR]["cleanup_status"] = 500
    [result] = await probe_once(base, cleanup={"method": "POST", "url": base + "/cleanup/{message_sid}"})

    assert result.reason == "cleanup"
    assert result.message.endswith("but cleanup POST answered HTTP 500, expected 2xx, 404")
    assert check_texts(result)[-1] == (False, "[CLEANUP] cleanup POST answered HTTP 500, expected 2xx, 404")


async def test_cleanup_runs_even_when_the_checks_fail_and_keeps_their_reason(platform: Sandbox,
                                                                           recorder: tuple[web.Application, str]) -> None:
    app, cleanup_base = recorder
    app[BEHAVIOUR]["cleanup_status"] = 500
    base = await platform()
    await set_faults(base, whatsapp_webhook="skip_validation")
    [result] = await probe_once(base, cleanup={"url": cleanup_base + "/cleanup/{message_sid}"})

    assert result.reason == "insecure"
    assert result.message.endswith("; also cleanup DELETE answered HTTP 500, expected 2xx, 404")
    assert [entry.get("cleanup") for entry in app[RECEIVED]] == [(await inbox(base))["messages"][0]["message_sid"]]


async def test_unreachable_cleanup_fails_as_cleanup(recorder: tuple[web.Application, str]) -> None:
    _, base = recorder
    [result] = await probe_once(base, cleanup={"url": f"http://127.0.0.1:{free_port()}" + "/x/{message_sid}"})

    assert result.reason == "cleanup"
    assert "cleanup DELETE failed: cannot connect" in result.message


async def test_cleanup_cut_off_by_the_runners_timeout_still_completes(recorder: tuple[web.Application, str]) -> None:
    # The checks pass quickly; the runner's 0.6 s timeout fires during the 1 s cleanup, which must still finish.
    app, base = recorder
    app[BEHAVIOUR]["cleanup_seconds"] = 1.0
    started = asyncio.get_running_loop().time()
    [result] = await probe_once(base, timeout=0.6, cleanup={"url": base + "/cleanup/{message_sid}"})

    assert result.reason == "timeout", result.message
    assert asyncio.get_running_loop().time() - started < 0.6 + 5 + 2  # timeout + cleanup_timeout
    await wait_until(lambda: any("cleanup" in entry for entry in app[RECEIVED]), timeout=7)
    [cleanup] = [entry for entry in app[RECEIVED] if "cleanup" in entry]
    assert cleanup["cleanup"] == app[RECEIVED][0]["form"]["MessageSid"]


async def test_cleanup_runs_after_a_timeout_during_the_checks(platform: Sandbox,
                                                              recorder: tuple[web.Application, str]) -> None:
    app, cleanup_base = recorder
    base = await platform()
    await set_faults(base, whatsapp_webhook="hang")
    [result] = await probe_once(base, timeout=SHORT_TIMEOUT, cleanup={"url": cleanup_base + "/cleanup/{message_sid}"})

    assert result.reason == "timeout" and "during signed" in result.message
    await wait_until(lambda: bool(app[RECEIVED]), timeout=7)
    [cleanup] = app[RECEIVED]
    assert MESSAGE_SID.match(cleanup["cleanup"]) and cleanup["method"] == "DELETE"


async def test_cancelling_a_run_during_its_cleanup_waits_for_the_cleanup_then_propagates(
    recorder: tuple[web.Application, str]
) -> None:
    app, base = recorder
    app[BEHAVIOUR]["cleanup_seconds"] = 1.0
    task = asyncio.create_task(probe_once(base, timeout=20, cleanup={"url": base + "/cleanup/{message_sid}"}))
    await wait_until(lambda: app[BEHAVIOUR].get("cleanups_started") == 1, timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [entry.get("cleanup") for entry in app[RECEIVED]][-1] == app[RECEIVED][0]["form"]["MessageSid"]


async def test_a_hanging_cleanup_is_bounded_by_cleanup_timeout(recorder: tuple[web.Application, str]) -> None:
    app, base = recorder
    app[BEHAVIOUR]["cleanup_seconds"] = 30.0
    started = asyncio.get_running_loop().time()
    [result] = await probe_once(base, timeout=5, cleanup={"url": base + "/cleanup/{message_sid}"},
                                cleanup_timeout="500ms")

    assert result.reason == "cleanup"
    assert result.message.endswith("but cleanup DELETE got no answer within cleanup_timeout 500ms")
    assert asyncio.get_running_loop().time() - started < 0.5 + 2


# --- settings and config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"url": "ftp://example.com/hook"}, "must be an absolute http:// or https:// URL"),
        ({"public_url": "support.example.com/hook"}, "must be an absolute http:// or https:// URL"),
        ({"account_sid": "AC123"}, "must be a Twilio account SID: 'AC' and 32 hexadecimal digits, got 'AC123'"),
        ({"from_number": "0800 123"}, "must be an E.164 number"),
        ({"to_number": "whatsapp:14155238886"}, "must be an E.164 number"),
        ({"expect_forged_status": [200, 403]}, "a forged webhook must be refused; 200 would pass"),
        ({"expect_forged_status": ["2xx"]}, "a forged webhook must be refused; 2xx would pass"),
        ({"expect_forged_status": [700]}, "status 700 is not between 100 and 599"),
        ({"synthetic_header": "X-Canary"}, 'must look like "Header-Name: value"'),
        ({"cleanup": {"url": "http://x.example/{ticket_id}"}}, "only {message_sid} may be filled in"),
        ({"cleanup": {"url": "/relative/{message_sid}"}}, "must be an absolute http:// or https:// URL"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_settings_are_refused_at_load(fields: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(error)):
        settings_for("http://127.0.0.1:8000", **fields)


def test_config_loads_the_probe_with_its_channel_and_a_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "twilio-token"
    token_file.write_text("token-from-a-file\n")
    path = write_config(tmp_path, f"""
        [[probes]]
        name = "whatsapp-inbound"
        type = "whatsapp"
        channel = "whatsapp"
        url = "${{PLATFORM_URL:-http://127.0.0.1:8000}}/whatsapp/webhook"
        public_url = "${{PLATFORM_PUBLIC_URL:-}}"
        auth_token_file = "{token_file}"
        account_sid = "{ACCOUNT_SID}"
        from_number = "whatsapp:{CANARY_NUMBER}"
        to_number = "{PLATFORM_NUMBER}"
    """)
    environ = {"PLATFORM_URL": "http://10.0.0.5:8000", "PLATFORM_PUBLIC_URL": "https://support.example.com"}
    config = load_config(path, PROBE_TYPES, environ=environ)

    [settings] = config.probes
    assert isinstance(settings, WhatsAppSettings) and settings.channel == "whatsapp"
    assert settings.url == "http://10.0.0.5:8000/whatsapp/webhook"
    assert settings.signed_url() == "https://support.example.com/whatsapp/webhook"
    assert settings.auth_token.get_secret_value() == "token-from-a-file"
    assert "token-from-a-file" in config.secrets
    assert settings.from_number == CANARY_NUMBER
    assert settings.target() == "POST http://10.0.0.5:8000/whatsapp/webhook"


# --- secrets ------------------------------------------------------------------------------------------------------


async def test_no_auth_token_in_messages_checks_or_logs(platform: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    token = "tok-9f8e7d6c5b4a39281706"
    base = await platform(token=token)
    caplog.set_level(logging.DEBUG)
    results: list[Result] = []
    for fault in ("ok", "reject_all", "skip_validation", "accept_unsigned", "bad_twiml", "error"):
        await set_faults(base, whatsapp_webhook=fault)
        results += await probe_once(base, auth_token=token, headers={"X-Api-Key": "key-1234567890"})
    await set_faults(base, whatsapp_webhook="ok")
    results += await probe_once(base, auth_token="a-stale-token-000111")

    assert [r.reason for r in results] == ["ok", "auth", "insecure", "insecure", "assertion", "status", "auth"]
    texts = [r.message for r in results] + [c.text for r in results for c in r.checks] + [caplog.text]
    for secret in (token, "a-stale-token-000111", "key-1234567890"):
        assert not any(secret in text for text in texts), secret
