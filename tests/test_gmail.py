"""The `gmail` probe against the sandbox's Google stand-ins and the platform's setup-watch, through the real
google-auth refresh and aiohttp: token, profile and watch phases, each runbook failure, the exported expiries,
settings validation, and that the client secret and refresh token never show anywhere."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from pydantic import ValidationError

from canary.config import load_config
from canary.contract import PhaseTimer, Result
from canary.runner import run_once
from canary.sandbox import gmail as sandbox_gmail
from canary.sandbox.faults import FAULTS
from canary.scrub import Scrubber
from probes import PROBE_TYPES
from probes.gmail import GmailProbe, GmailSettings, parse_expiration
from tests.conftest import ROOT, free_port, start_app, write_config

RUN_TIMEOUT = 5.0
HANG_TIMEOUT = 0.5
SECRETS = (sandbox_gmail.CLIENT_SECRET, sandbox_gmail.REFRESH_TOKEN)
SHIPPED_FILE = ROOT / "deploy" / "sandbox" / "gmail-authorized-user.json"


def write_credentials(tmp_path: Path, token_uri: str | None, **override: Any) -> Path:
    document: dict[str, Any] = {
        "type": "authorized_user",
        "client_id": sandbox_gmail.CLIENT_ID,
        "client_secret": sandbox_gmail.CLIENT_SECRET,
        "refresh_token": sandbox_gmail.REFRESH_TOKEN,
        **({"token_uri": token_uri} if token_uri else {}),
        **override,
    }
    path = tmp_path / "gmail-authorized-user.json"
    path.write_text(json.dumps({k: v for k, v in document.items() if v is not None}))
    return path


def settings(base_url: str, credentials: Path | str, **extra: Any) -> GmailSettings:
    return GmailSettings.model_validate({
        "name": "gmail", "type": "gmail", "channel": "email", "interval": "5m", "timeout": "5s",
        "credentials_file": str(credentials),
        "gmail_api_url": f"{base_url}/google",
        "renew_url": f"{base_url}/gmail/setup-watch",
        **extra,
    })


@pytest.fixture
def credentials(tmp_path: Path, sandbox: tuple[web.Application, str]) -> Path:
    return write_credentials(tmp_path, f"{sandbox[1]}/google/token")


@pytest.fixture
async def probe(sandbox: tuple[web.Application, str], credentials: Path):  # type: ignore[no-untyped-def]
    built = GmailProbe(settings(sandbox[1], credentials))
    try:
        yield built
    finally:
        await built.close()


async def run(probe: GmailProbe, timeout: float = RUN_TIMEOUT) -> Result:
    return await run_once(probe, timeout, Scrubber(probe.settings.secret_values()))


def fault(app: web.Application, **changes: str) -> None:
    app[FAULTS].update(changes)


def state(app: web.Application) -> sandbox_gmail.GmailState:
    return app[sandbox_gmail.GMAIL]


def gauges(result: Result) -> dict[str, float]:
    return {gauge.name: gauge.value for gauge in result.gauges}


def assert_no_secret(result: Result, logs: str = "") -> None:
    shown = " ".join([result.message, *(check.text for check in result.checks), logs])
    for secret in SECRETS:
        assert secret not in shown


# --- healthy ---------------------------------------------------------------------------------------------------


async def test_healthy_run_refreshes_reads_the_profile_and_renews_the_watch(
    probe: GmailProbe, sandbox: tuple[web.Application, str]
) -> None:
    app, _ = sandbox
    result = await run(probe)
    assert result.success, result.message
    assert set(result.phases) == {"token", "profile", "watch"}
    assert f"Gmail profile of {sandbox_gmail.EMAIL_ADDRESS} answered" in result.message
    assert "watch renewed, expires in 7.0d" in result.message
    seen = state(app)
    assert (seen.token_requests, seen.profile_requests, len(seen.watch_calls)) == (1, 1, 1)
    assert seen.watch_calls[0]["synthetic"] is True


async def test_the_shipped_credentials_file_is_what_the_sandbox_accepts(
    sandbox: tuple[web.Application, str]
) -> None:
    document = json.loads(SHIPPED_FILE.read_text())
    assert document == {
        "type": "authorized_user",
        "client_id": sandbox_gmail.CLIENT_ID,
        "client_secret": sandbox_gmail.CLIENT_SECRET,
        "refresh_token": sandbox_gmail.REFRESH_TOKEN,
        "token_uri": "http://127.0.0.1:8000/google/token",
    }
    app, url = sandbox  # the sandbox here is on a free port, so oauth_token_url points the shipped file at it
    probe = GmailProbe(settings(url, SHIPPED_FILE, oauth_token_url=f"{url}/google/token"))
    try:
        result = await run(probe)
    finally:
        await probe.close()
    assert result.success, result.message
    assert state(app).token_requests == 1


async def test_the_files_token_uri_is_used_not_googles(sandbox: tuple[web.Application, str], tmp_path: Path) -> None:
    # google-auth's from_authorized_user_info always sets Google's token endpoint; the probe must restore the file's.
    app, url = sandbox
    probe = GmailProbe(settings(url, write_credentials(tmp_path, f"{url}/google/token")))
    try:
        assert (await run(probe)).success
    finally:
        await probe.close()
    assert state(app).token_requests == 1


async def test_renew_false_skips_the_watch(sandbox: tuple[web.Application, str], credentials: Path) -> None:
    app, url = sandbox
    probe = GmailProbe(settings(url, credentials, renew=False, renew_url=None))
    try:
        result = await run(probe)
    finally:
        await probe.close()
    assert result.success, result.message
    assert set(result.phases) == {"token", "profile"}
    assert state(app).watch_calls == []
    assert "gmail_watch_expiry_timestamp_seconds" not in gauges(result)


# --- token -----------------------------------------------------------------------------------------------------


async def test_revoked_refresh_token_fails_with_invalid_grant(probe: GmailProbe, sandbox: tuple[web.Application, str]) -> None:
    app, _ = sandbox
    fault(app, gmail_oauth="revoked")
    result = await run(probe)
    assert result.reason == "invalid_grant"
    assert "invalid_grant: Token has been expired or revoked." in result.message
    assert "revoked or has expired" in result.message
    assert "Gmail channel will stop" in result.message
    assert result.phases.keys() == {"token"}
    assert state(app).profile_requests == 0 and state(app).watch_calls == []


async def test_a_refresh_token_the_provider_does_not_know_is_invalid_grant(
    sandbox: tuple[web.Application, str], tmp_path: Path
) -> None:
    app, url = sandbox
    path = write_credentials(tmp_path, f"{url}/google/token", refresh_token="1//some-other-refresh-token")
    probe = GmailProbe(settings(url, path))
    try:
        result = await run(probe)
    finally:
        await probe.close()
    assert result.reason == "invalid_grant"
    assert "1//some-other-refresh-token" not in result.message


async def test_invalid_client_fails_with_auth(probe: GmailProbe, sandbox: tuple[web.Application, str]) -> None:
    app, _ = sandbox
    fault(app, gmail_oauth="invalid_client")
    result = await run(probe)
    assert result.reason == "auth"
    assert "invalid_client: Unauthorized" in result.message
    assert "check client_id and client_secret in the credentials_file" in result.message
    assert str(probe.settings.credentials_file.path) not in result.message  # messages reach the status page
    assert state(app).profile_requests == 0


async def test_token_endpoint_server_error_fails_with_status(probe: GmailProbe, sandbox: tuple[web.Application, str]) -> None:
    app, _ = sandbox
    fault(app, gmail_oauth="error")
    result = await run(probe, timeout=10.0)  # google-auth retries a 503 twice, backing off ~1 s and ~2 s
    assert result.reason == "status"
    assert "temporarily_unavailable" in result.message
    assert state(app).token_requests == 3


async def test_token_endpoint_hang_times_out_in_the_token_phase(
    probe: GmailProbe, sandbox: tuple[web.Application, str]
) -> None:
    app, _ = sandbox
    fault(app, gmail_oauth="hang")
    started = time.monotonic()
    result = await run(probe, timeout=HANG_TIMEOUT)
    assert time.monotonic() - started < HANG_TIMEOUT + 1.0
    assert result.reason == "timeout"
    assert result.message == "no answer within 500ms during token"
    # The event loop stayed free: the refresh ran in a thread, so the sandbox (same loop) still answers at once.
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{sandbox[1]}/_sandbox/gmail", timeout=aiohttp.ClientTimeout(total=1)) as response:
            assert (await response.json())["token_requests"] == 1


async def test_a_hung_token_endpoint_releases_its_thread_after_the_probe_timeout(
    sandbox: tuple[web.Application, str], credentials: Path
) -> None:
    # google-auth asks requests for 120 s; the probe's session cuts every call to the probe's timeout (+1 s), so
    # even with a runner allowing longer, the worker thread comes back on its own.
    app, url = sandbox
    fault(app, gmail_oauth="hang")
    probe = GmailProbe(settings(url, credentials, timeout="500ms"))
    started = time.monotonic()
    try:
        result = await run(probe, timeout=10.0)
    finally:
        await probe.close()
    assert 1.4 < time.monotonic() - started < 3.0
    assert result.reason == "timeout"
    assert result.message == f"the token endpoint {url}/google/token did not answer in time"


async def test_provider_text_echoing_a_secret_is_scrubbed_by_the_probe_itself(
    tmp_path: Path, credentials: Path
) -> None:
    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        description = f"client {form['client_id']} with secret {form['client_secret']} and {form['refresh_token']}"
        return web.json_response({"error": "invalid_client", "error_description": description}, status=401)

    app = web.Application()
    app.router.add_post("/token", token)
    runner, url = await start_app(app)
    try:
        probe = GmailProbe(settings(url, credentials, oauth_token_url=f"{url}/token"))
        result = await probe.run(PhaseTimer())  # not through the runner, whose scrubber would hide a leak
        await probe.close()
    finally:
        await runner.cleanup()
    assert result.reason == "auth"
    assert f"invalid_client: client {sandbox_gmail.CLIENT_ID} with secret *** and ***" in result.message
    assert_no_secret(result)


async def test_unreachable_token_endpoint_fails_with_connect(
    sandbox: tuple[web.Application, str], tmp_path: Path
) -> None:
    _, url = sandbox
    dead = f"http://127.0.0.1:{free_port()}/token"
    probe = GmailProbe(settings(url, write_credentials(tmp_path, dead)))
    try:
        result = await run(probe)
    finally:
        await probe.close()
    assert result.reason == "connect"
    assert result.message.startswith(f"cannot reach the token endpoint {dead}: ")
    assert "refused" in result.message.lower()


async def test_oauth_token_url_overrides_the_file(sandbox: tuple[web.Application, str], tmp_path: Path) -> None:
    app, url = sandbox
    path = write_credentials(tmp_path, f"http://127.0.0.1:{free_port()}/token")
    probe = GmailProbe(settings(url, path, oauth_token_url=f"{url}/google/token"))
    try:
        assert (await run(probe)).success
    finally:
        await probe.close()
    assert state(app).token_requests == 1


async def test_access_token_expiry_gauge_is_what_the_sandbox_issued(
    probe: GmailProbe, sandbox: tuple[web.Application, str]
) -> None:
    app, _ = sandbox
    result = await run(probe)
    issued = state(app).last_token_expiry
    assert issued is not None
    # google-auth counts expires_in (3599 s) from when the answer arrived, on the probe's clock.
    assert abs(gauges(result)["gmail_access_token_expiry_timestamp_seconds"] - issued) < 2.0
    assert "access token refreshed (valid 59m)" in result.message


# --- profile ---------------------------------------------------------------------------------------------------


async def test_gmail_api_401_fails_with_auth(probe: GmailProbe, sandbox: tuple[web.Application, str]) -> None:
    app, _ = sandbox
    fault(app, gmail_api="unauthorized")
    result = await run(probe)
    assert result.reason == "auth"
    assert result.message.startswith("Gmail users.getProfile answered HTTP 401 (UNAUTHENTICATED: Request had invalid")
    assert "refused the freshly refreshed access token" in result.message
    assert "gmail_access_token_expiry_timestamp_seconds" in gauges(result)  # the token phase passed
    assert state(app).watch_calls == []
    assert "ya29." not in result.message


async def test_gmail_api_server_error_fails_with_status(probe: GmailProbe, sandbox: tuple[web.Application, str]) -> None:
    app, _ = sandbox
    fault(app, gmail_api="error")
    result = await run(probe)
    assert result.reason == "status"
    assert "HTTP 500 (INTERNAL: Internal error encountered.), expected 200" in result.message


async def test_gmail_api_hang_times_out_in_the_profile_phase(
    probe: GmailProbe, sandbox: tuple[web.Application, str]
) -> None:
    fault(sandbox[0], gmail_api="hang")
    result = await run(probe, timeout=HANG_TIMEOUT)
    assert (result.reason, result.message) == ("timeout", "no answer within 500ms during profile")


async def test_expect_email(sandbox: tuple[web.Application, str], credentials: Path) -> None:
    _, url = sandbox
    matching = GmailProbe(settings(url, credentials, expect_email="Support@Sandbox.example", renew=False))
    other = GmailProbe(settings(url, credentials, expect_email="billing@sandbox.example", renew=False))
    try:
        assert (await run(matching)).success
        result = await run(other)
    finally:
        await matching.close()
        await other.close()
    assert result.reason == "assertion"
    assert result.message == "the token belongs to mailbox support@sandbox.example, expected billing@sandbox.example"


# --- watch -----------------------------------------------------------------------------------------------------


async def test_unknown_watch_is_renewed_once_then_left_alone_while_far_from_expiry(
    probe: GmailProbe, sandbox: tuple[web.Application, str]
) -> None:
    app, _ = sandbox
    first = await run(probe)
    assert first.success, first.message
    assert len(state(app).watch_calls) == 1
    issued = int(state(app).watch_calls[0]["expiration"]) / 1000
    assert gauges(first)["gmail_watch_expiry_timestamp_seconds"] == issued

    second = await run(probe)
    assert second.success, second.message
    assert len(state(app).watch_calls) == 1  # not renewed again
    assert "(renewal not due)" in second.message
    assert gauges(second)["gmail_watch_expiry_timestamp_seconds"] == issued
    assert state(app).token_requests == 2  # but the token is refreshed every run


async def test_a_restored_watch_expiry_is_not_renewed_again_and_no_token_is_kept(
    sandbox: tuple[web.Application, str], credentials: Path
) -> None:
    """What a reload or a restart does with it: export, then restore into a newly built probe."""
    app, base = sandbox
    first, second = GmailProbe(settings(base, credentials)), GmailProbe(settings(base, credentials, interval="10m"))
    try:
        assert (await run(first)).success
        saved = first.export_state()
        assert saved == {"watch_expiry": int(state(app).watch_calls[0]["expiration"]) / 1000}  # Unix time
        assert first.state_key() == second.state_key()
        second.restore_state(saved)
        again = await run(second)
        assert again.success, again.message
        assert "(renewal not due)" in again.message
        assert len(state(app).watch_calls) == 1
        assert not any(secret in str(saved) for secret in (*SECRETS, "ya29."))
    finally:
        await first.close()
        await second.close()
    other_platform = GmailProbe(settings(base, credentials, renew_url="http://127.0.0.1:9/gmail/setup-watch"))
    assert other_platform.state_key() != first.state_key()


@pytest.mark.parametrize("saved", [
    pytest.param({"watch_expiry": time.time() + 30 * 86400}, id="longer-than-a-watch-lasts"),
    pytest.param({"watch_expiry": -1.0}, id="negative"),
    pytest.param({"watch_expiry": float("nan")}, id="nan"),
    pytest.param({"watch_expiry": "soon"}, id="a-string"),
    pytest.param({"watch_expiry": 1.0, "access_token": "ya29.x"}, id="an-unknown-key"),
])
def test_a_corrupt_or_hostile_watch_expiry_is_refused_and_changes_nothing(credentials: Path, saved: dict[str, Any]) -> None:
    probe = GmailProbe(settings("http://127.0.0.1:9", credentials))
    with pytest.raises(ValueError):
        probe.restore_state(saved)
    assert probe.export_state() == {}


WATCH_CALLS = web.AppKey("watch_calls", list)
FAIL = web.AppKey("fail", list)  # non-empty: setup-watch answers 500
SHORT_WATCH = 2 * 3600.0


@pytest.fixture
async def short_watch() -> AsyncIterator[tuple[web.Application, str]]:
    """A platform whose setup-watch grants 2 hours, with `expiration` as a JSON number, or 500 once told to."""

    async def setup_watch(request: web.Request) -> web.Response:
        request.app[WATCH_CALLS].append(dict(request.headers))
        if request.app[FAIL]:
            return web.json_response({"detail": "Internal Server Error"}, status=500)
        return web.json_response({"historyId": "7", "expiration": int((time.time() + SHORT_WATCH) * 1000)})

    app = web.Application()
    app[WATCH_CALLS] = []
    app[FAIL] = []
    app.router.add_post("/gmail/setup-watch", setup_watch)
    runner, url = await start_app(app)
    try:
        yield app, f"{url}/gmail/setup-watch"
    finally:
        await runner.cleanup()


async def test_watch_inside_renew_before_is_renewed_every_run(
    sandbox: tuple[web.Application, str], credentials: Path, short_watch: tuple[web.Application, str]
) -> None:
    platform, renew_url = short_watch
    probe = GmailProbe(settings(sandbox[1], credentials, renew_url=renew_url, renew_before="3h", min_watch_remaining="1h",
                                renew_headers={"Authorization": "Bearer platform-admin-token-123"}))
    try:
        first, second = await run(probe), await run(probe)
    finally:
        await probe.close()
    assert first.success and second.success, (first.message, second.message)
    assert "watch renewed, expires in 2.0h" in second.message
    assert len(platform[WATCH_CALLS]) == 2  # 2 h left is inside renew_before (3 h): renewed on every run
    assert all(headers["Authorization"] == "Bearer platform-admin-token-123" for headers in platform[WATCH_CALLS])
    assert all(headers["X-Synthetic-Canary"] == "1" for headers in platform[WATCH_CALLS])
    assert "Bearer platform-admin-token-123" in probe.settings.secret_values()


async def test_failed_renewal_keeps_exporting_the_last_known_expiry(
    sandbox: tuple[web.Application, str], credentials: Path, short_watch: tuple[web.Application, str]
) -> None:
    platform, renew_url = short_watch
    probe = GmailProbe(settings(sandbox[1], credentials, renew_url=renew_url, renew_before="3h", min_watch_remaining="1h"))
    try:
        first = await run(probe)
        platform[FAIL].append(True)
        second = await run(probe)
    finally:
        await probe.close()
    assert first.success, first.message
    assert second.reason == "status" and "the Gmail watch could not be renewed" in second.message
    known = gauges(first)["gmail_watch_expiry_timestamp_seconds"]
    assert abs(known - (time.time() + SHORT_WATCH)) < 5
    assert gauges(second)["gmail_watch_expiry_timestamp_seconds"] == known


async def test_expiring_watch_fails_with_expiry_and_is_retried_next_run(
    probe: GmailProbe, sandbox: tuple[web.Application, str]
) -> None:
    app, _ = sandbox
    fault(app, gmail_watch="expiring")
    result = await run(probe)
    assert result.reason == "expiry"
    assert "after renewal the Gmail watch expires in" in result.message
    assert "expected at least 1.0d" in result.message
    issued = int(state(app).watch_calls[0]["expiration"]) / 1000
    assert gauges(result)["gmail_watch_expiry_timestamp_seconds"] == issued
    assert issued - time.time() < 3700

    again = await run(probe)
    assert again.reason == "expiry"
    assert len(state(app).watch_calls) == 2  # still near expiry: renewing again

    fault(app, gmail_watch="ok")
    healed = await run(probe)
    assert healed.success, healed.message
    assert len(state(app).watch_calls) == 3


async def test_renew_endpoint_error_fails_naming_the_watch(probe: GmailProbe, sandbox: tuple[web.Application, str]) -> None:
    app, _ = sandbox
    fault(app, gmail_watch="error")
    result = await run(probe)
    assert result.reason == "status"
    assert result.message.startswith("the Gmail watch could not be renewed: POST ")
    assert "/gmail/setup-watch answered HTTP 500" in result.message
    assert "gmail_watch_expiry_timestamp_seconds" not in gauges(result)  # never learnt
    assert "gmail_access_token_expiry_timestamp_seconds" in gauges(result)


async def test_renew_endpoint_unreachable_fails_with_connect(sandbox: tuple[web.Application, str], credentials: Path) -> None:
    _, url = sandbox
    probe = GmailProbe(settings(url, credentials, renew_url=f"http://127.0.0.1:{free_port()}/gmail/setup-watch"))
    try:
        result = await run(probe)
    finally:
        await probe.close()
    assert result.reason == "connect"
    assert result.message.startswith("the Gmail watch could not be renewed: ")


async def test_renew_endpoint_hang_times_out_in_the_watch_phase(
    probe: GmailProbe, sandbox: tuple[web.Application, str]
) -> None:
    fault(sandbox[0], gmail_watch="hang")
    result = await run(probe, timeout=1.5)
    assert (result.reason, result.message) == ("timeout", "no answer within 1.5s during watch")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"historyId": "1", "expiration": "1700000000000"}', 1_700_000_000.0),
        (b'{"historyId": "1", "expiration": 1700000000500}', 1_700_000_000.5),
        (b'{"historyId": "1"}', None),
        (b'{"expiration": "soon"}', None),
        (b'{"expiration": true}', None),
        (b'{"expiration": "-5"}', None),
        (b"not json", None),
        (b'["expiration"]', None),
    ],
)
def test_parse_expiration(body: bytes, expected: float | None) -> None:
    assert parse_expiration(body) == expected


# --- secrets ---------------------------------------------------------------------------------------------------


async def test_secrets_never_show_in_messages_checks_or_logs(
    probe: GmailProbe, sandbox: tuple[web.Application, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="google")  # google-auth logs its requests only when "google" is set up
    app, _ = sandbox
    results = []
    for changes in ({"gmail_watch": "expiring"}, {"gmail_watch": "error"}, {"gmail_oauth": "revoked"},
                    {"gmail_oauth": "invalid_client"}, {"gmail_oauth": "ok", "gmail_api": "unauthorized"},
                    {"gmail_api": "ok", "gmail_watch": "ok"}):
        fault(app, **changes)
        results.append(await run(probe))
    assert [r.reason for r in results] == ["expiry", "status", "invalid_grant", "auth", "auth", "ok"]
    assert any(record.name.startswith("google") for record in caplog.records)  # the check below saw real logs
    logs = "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
    for result in results:
        assert_no_secret(result, logs)
    assert SECRETS[0] not in repr(probe.settings) and SECRETS[1] not in repr(probe.settings)


def test_secret_values_hold_the_client_secret_and_refresh_token(credentials: Path) -> None:
    values = settings("http://127.0.0.1:1", credentials).secret_values()
    assert set(SECRETS) <= set(values)


def test_config_load_scrubs_the_files_secrets(tmp_path: Path, credentials: Path) -> None:
    path = write_config(tmp_path, f"""
        [[probes]]
        name = "gmail"
        type = "gmail"
        channel = "email"
        credentials_file = "{credentials}"
        gmail_api_url = "http://127.0.0.1:8000/google"
        renew_url = "http://127.0.0.1:8000/gmail/setup-watch"
        oauth_token_url = ""
    """)
    config = load_config(path, PROBE_TYPES)
    assert set(SECRETS) <= config.secrets
    (gmail_settings,) = config.probes
    assert isinstance(gmail_settings, GmailSettings)
    assert gmail_settings.oauth_token_url is None
    assert gmail_settings.interval == 30.0 and gmail_settings.timeout == 10.0
    assert config.scrubber()(f"x {SECRETS[0]} {SECRETS[1]} y") == "x *** *** y"


# --- settings --------------------------------------------------------------------------------------------------


def validation_error(**extra: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        GmailSettings.model_validate({"name": "g", "channel": "email", "renew_url": "http://127.0.0.1:8000/w", **extra})
    return str(caught.value)


def test_missing_credentials_file_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    error = validation_error(credentials_file=str(tmp_path / "absent.json"))
    assert "credentials_file" in error
    assert f"cannot read '{tmp_path / 'absent.json'}' (No such file or directory)" in error


def test_relative_credentials_path_resolves_against_the_working_directory(
    tmp_path: Path, credentials: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(credentials.parent)
    loaded = settings("http://127.0.0.1:1", credentials.name)
    assert loaded.credentials_file.path == str(credentials)
    assert loaded.target() == "gmail http://127.0.0.1:1/google"  # the path is not shown where targets are


def test_credentials_file_format_errors_never_show_secrets(tmp_path: Path) -> None:
    path = write_credentials(tmp_path, None, refresh_token=None)
    error = validation_error(credentials_file=str(path))
    assert "missing fields refresh_token" in error
    assert SECRETS[0] not in error

    path.write_text(json.dumps({"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----"}))
    error = validation_error(credentials_file=str(path))
    assert "holds 'service_account' credentials" in error and "PRIVATE KEY" not in error

    path.write_text(f'{{"client_secret": "{SECRETS[0]}", ')
    error = validation_error(credentials_file=str(path))
    assert "is not valid JSON" in error and SECRETS[0] not in error


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"renew_url": None}, "renew_url is required while renew is on"),
        ({"renew_before": "7d"}, "renew_before must be shorter than the 7 days"),
        ({"renew_before": "6h", "min_watch_remaining": "12h"}, "min_watch_remaining must not exceed renew_before"),
        ({"gmail_api_url": "gmail.googleapis.com"}, "must be an absolute http:// or https:// URL"),
        ({"oauth_token_url": "ftp://x/token"}, "must be an absolute http:// or https:// URL"),
        ({"synthetic_header": "X-Canary"}, 'must look like "Header-Name: value"'),
        ({"surprise": 1}, "Extra inputs are not permitted"),
    ],
)
def test_settings_refused_at_load(credentials: Path, extra: dict[str, Any], message: str) -> None:
    assert message in validation_error(credentials_file=str(credentials), **extra)


def test_renew_false_needs_no_renew_url(credentials: Path) -> None:
    loaded = GmailSettings.model_validate(
        {"name": "g", "channel": "email", "credentials_file": str(credentials), "renew": False}
    )
    assert loaded.renew_url is None and loaded.gmail_api_url == "https://gmail.googleapis.com"
    assert loaded.token_uri().endswith("/google/token")


# --- the sandbox's wire format ---------------------------------------------------------------------------------


async def test_sandbox_speaks_googles_formats(sandbox: tuple[web.Application, str]) -> None:
    _, url = sandbox
    form = {"grant_type": "refresh_token", "client_id": sandbox_gmail.CLIENT_ID,
            "client_secret": sandbox_gmail.CLIENT_SECRET, "refresh_token": sandbox_gmail.REFRESH_TOKEN}
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{url}/google/token", data=form) as response:
            assert response.status == 200
            granted = await response.json()
        assert granted["expires_in"] == 3599 and granted["token_type"] == "Bearer"
        assert set(granted) == {"access_token", "expires_in", "scope", "token_type"}
        async with client.post(f"{url}/google/token", data={**form, "client_secret": "wrong"}) as response:
            assert (response.status, await response.json()) == (401, {"error": "invalid_client", "error_description": "Unauthorized"})
        async with client.post(f"{url}/google/token", data={**form, "grant_type": "password"}) as response:
            assert response.status == 400 and (await response.json())["error"] == "unsupported_grant_type"

        profile = f"{url}/google/gmail/v1/users/me/profile"
        async with client.get(profile, headers={"Authorization": f"Bearer {granted['access_token']}"}) as response:
            assert response.status == 200
            body = await response.json()
        assert set(body) == {"emailAddress", "messagesTotal", "threadsTotal", "historyId"}
        assert isinstance(body["historyId"], str)
        async with client.get(profile, headers={"Authorization": "Bearer ya29.not-issued"}) as response:
            assert response.status == 401
            assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
            assert (await response.json())["error"]["status"] == "UNAUTHENTICATED"

        async with client.post(f"{url}/gmail/setup-watch") as response:
            watch = await response.json()
        assert set(watch) == {"historyId", "expiration"} and isinstance(watch["expiration"], str)
        assert abs(int(watch["expiration"]) / 1000 - (time.time() + 7 * 86400)) < 5
        async with client.get(f"{url}/_sandbox/gmail") as response:
            seen = await response.json()
        assert seen["watch_calls"] == [{"synthetic": False, "expiration": watch["expiration"]}]
        assert seen["token_requests"] == 3


async def test_faults_switch_over_http(sandbox: tuple[web.Application, str]) -> None:
    _, url = sandbox
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{url}/_sandbox/faults", json={"gmail_watch": "sometimes"}) as response:
            assert response.status == 400
        async with client.post(f"{url}/_sandbox/faults", json={"gmail_oauth": "revoked"}) as response:
            assert (await response.json())["gmail_oauth"] == "revoked"
