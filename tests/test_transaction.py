"""The `transaction` probe against the sandbox's real ticket endpoints: the web-form canary end to end,
every failure the runbooks name, and cleanup after failures, timeouts and stops."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from pydantic import ValidationError

from canary.runner import run_once
from canary.sandbox.faults import FAULTS
from canary.sandbox.platform import DESK
from canary.scrub import Scrubber
from probes.transaction import TransactionProbe, TransactionSettings
from tests.conftest import ROOT, Process, free_port, probe_command, start_app, wait_for_port, wait_until, write_config


def web_form(platform: str, within: str = "3s", **overrides: Any) -> TransactionSettings:
    raw: dict[str, Any] = {
        "name": "web-form",
        "type": "transaction",
        "channel": "web_form",
        "interval": "1m",
        "timeout": "20s",
        "base_url": platform,
        "steps": [
            {
                "name": "submit",
                "method": "POST",
                "url": "/support/submit",
                "json": {"name": "Canary", "email": "canary@example.com", "subject": "[canary] {run_id}",
                         "message": "synthetic"},
                "expect_status": [201],
                "expect": ["ticket_id exists"],
                "extract": {"ticket_id": "ticket_id"},
            },
            {
                "name": "agent_reply",
                "url": "/support/ticket/{ticket_id}",
                "expect": ['status != "open"', 'messages[*].role contains "agent"'],
                "poll": {"every": "100ms", "within": within},
            },
        ],
        "cleanup": [
            {"name": "delete_ticket", "method": "DELETE", "url": "/support/ticket/{ticket_id}",
             "expect_status": ["2xx", 404]},
        ],
        "cleanup_timeout": "1s",
    }
    raw.update(overrides)
    return TransactionSettings.model_validate(raw)


async def run(settings: TransactionSettings, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    probe = TransactionProbe(settings)
    try:
        return await run_once(probe, timeout, Scrubber(settings.secret_values()))
    finally:
        await probe.close()


def tickets(app) -> dict:  # type: ignore[no-untyped-def, type-arg]
    return app[DESK].tickets


async def test_healthy_web_form_passes_and_leaves_no_ticket(sandbox) -> None:  # type: ignore[no-untyped-def]
    app, url = sandbox
    app[FAULTS].update({"agent_delay_seconds": 0.3})
    result = await run(web_form(url))
    assert result.success, result.message
    assert set(result.phases) == {"submit", "agent_reply", "delete_ticket"}
    assert result.phases["agent_reply"] >= 0.25  # time to the agent's reply is measured
    assert "submit" in result.message and "agent_reply" in result.message
    assert tickets(app) == {}
    assert any(check.text == '[agent_reply] messages[*].role contains "agent" (got ["customer", "agent"])'
               for check in result.checks)


async def test_canary_ticket_is_marked_synthetic(sandbox) -> None:  # type: ignore[no-untyped-def]
    app, url = sandbox
    app[FAULTS].update({"agent": "stalled", "delete": "error"})  # keep the ticket around to look at it
    result = await run(web_form(url, within="200ms"))
    assert result.reason == "slow"
    [ticket] = tickets(app).values()
    assert ticket.synthetic and ticket.subject.startswith("[canary] ")


@pytest.mark.parametrize(
    ("faults", "reason", "fragment"),
    [
        ({"submit": "error"}, "status", "step submit: HTTP 500, expected 201"),
        ({"agent": "stalled"}, "slow", "step agent_reply: not done within 500ms"),
    ],
)
async def test_runbook_failures(sandbox, faults: dict, reason: str, fragment: str) -> None:  # type: ignore[no-untyped-def, type-arg]
    app, url = sandbox
    app[FAULTS].update(faults)
    result = await run(web_form(url, within="500ms"))
    assert (result.success, result.reason) == (False, reason)
    assert fragment in result.message
    assert tickets(app) == {}  # cleanup ran, or nothing was ever created


async def test_an_answer_without_a_ticket_id_fails_and_names_the_missing_value(sandbox) -> None:  # type: ignore[no-untyped-def]
    # The platform created a ticket but did not say which: the canary cannot delete what it cannot name.
    app, url = sandbox
    app[FAULTS].update({"submit": "no_ticket_id", "agent": "stalled"})
    result = await run(web_form(url))
    assert result.reason == "assertion"
    assert result.message == "step submit: [submit] ticket_id exists"
    app[DESK].tickets.clear()


async def test_an_escalated_ticket_counts_as_answered(sandbox) -> None:  # type: ignore[no-untyped-def]
    app, url = sandbox
    app[FAULTS].update({"agent": "escalate", "agent_delay_seconds": 0.1})
    result = await run(web_form(url))
    assert result.success, result.message


async def test_a_hanging_form_times_out(sandbox) -> None:  # type: ignore[no-untyped-def]
    app, url = sandbox
    app[FAULTS].update({"submit": "hang"})
    started = time.monotonic()
    result = await run(web_form(url), timeout=0.5)
    assert result.reason == "timeout" and "during submit" in result.message
    assert time.monotonic() - started < 2
    assert tickets(app) == {}


async def test_cleanup_runs_after_the_probe_times_out_mid_poll(sandbox) -> None:  # type: ignore[no-untyped-def]
    app, url = sandbox
    app[FAULTS].update({"agent": "stalled"})
    result = await run(web_form(url, within="10s"), timeout=0.6)
    assert result.reason == "timeout" and "during agent_reply" in result.message
    assert tickets(app) == {}


async def test_cleanup_runs_when_the_run_is_cancelled(sandbox) -> None:  # type: ignore[no-untyped-def]
    app, url = sandbox
    app[FAULTS].update({"agent": "stalled"})
    task = asyncio.create_task(run(web_form(url, within="10s")))
    deadline = time.monotonic() + 5
    while not tickets(app) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert tickets(app), "the submit step never created a ticket"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tickets(app) == {}


async def test_a_failed_cleanup_is_reported_on_its_own(sandbox) -> None:  # type: ignore[no-untyped-def]
    app, url = sandbox
    app[FAULTS].update({"delete": "error", "agent_delay_seconds": 0.1})
    result = await run(web_form(url))
    assert result.reason == "cleanup"
    assert "checks passed but cleanup failed: delete_ticket: HTTP 500" in result.message
    app[DESK].tickets.clear()

    app[FAULTS].update({"agent": "stalled"})
    result = await run(web_form(url, within="300ms"))
    assert result.reason == "slow" and "cleanup also failed: delete_ticket: HTTP 500" in result.message
    app[DESK].tickets.clear()


async def test_a_hanging_cleanup_is_bounded_by_cleanup_timeout(sandbox) -> None:  # type: ignore[no-untyped-def]
    app, url = sandbox
    app[FAULTS].update({"delete": "hang", "agent_delay_seconds": 0.1})
    started = time.monotonic()
    result = await run(web_form(url))
    assert result.reason == "cleanup" and "no answer within cleanup_timeout 1s" in result.message
    assert time.monotonic() - started < 3
    app[DESK].tickets.clear()


# --- cleanup that outlives the runner's timeout -----------------------------------------------------------------

SLOW_DESK = web.AppKey("slow_desk", dict)


async def _slow_submit(request: web.Request) -> web.Response:
    desk = request.app[SLOW_DESK]
    await asyncio.sleep(desk["submit_seconds"])
    ticket_id = f"t{len(desk['created']) + 1}"
    desk["created"].append(ticket_id)
    desk["open"].add(ticket_id)
    return web.json_response({"id": ticket_id}, status=201)


async def _slow_delete(request: web.Request) -> web.Response:
    desk = request.app[SLOW_DESK]
    desk["deletes_started"] += 1
    await asyncio.sleep(desk["delete_seconds"])  # cancelled (nothing deleted) if the client gives up first
    desk["open"].discard(request.match_info["ticket_id"])
    return web.Response(status=204)


@pytest.fixture
async def slow_desk():  # type: ignore[no-untyped-def]
    """A ticket API whose submit takes 0.3 s and whose delete takes 1 s. It drops a request whose client went away
    (handler cancellation), so a delete the canary stops waiting for never happens, as on a platform whose request
    is rolled back when the connection goes."""
    app = web.Application()
    app[SLOW_DESK] = {"submit_seconds": 0.3, "delete_seconds": 1.0, "created": [], "open": set(), "deletes_started": 0}
    app.router.add_post("/tickets", _slow_submit)
    app.router.add_delete("/tickets/{ticket_id}", _slow_delete)
    runner, url = await start_app(app, handler_cancellation=True)
    try:
        yield app[SLOW_DESK], url
    finally:
        await runner.cleanup()


def submit_then_delete(base: str) -> TransactionSettings:
    return TransactionSettings.model_validate({
        "name": "slow-desk", "type": "transaction", "channel": "web_form", "interval": "1m", "timeout": "20s",
        "base_url": base,
        "steps": [{"name": "submit", "method": "POST", "url": "/tickets", "json": {"subject": "[canary] {run_id}"},
                   "extract": {"ticket_id": "id"}}],
        "cleanup": [{"name": "delete_ticket", "method": "DELETE", "url": "/tickets/{ticket_id}"}],
        "cleanup_timeout": "5s",
    })


async def test_cleanup_cut_off_by_the_runners_timeout_still_deletes_the_ticket(slow_desk) -> None:  # type: ignore[no-untyped-def]
    # submit (0.3 s) passes, the runner's 0.6 s timeout fires during the 1 s delete: the delete must still finish.
    desk, base = slow_desk
    started = time.monotonic()
    result = await run(submit_then_delete(base), timeout=0.6)

    assert result.reason == "timeout", result.message
    assert time.monotonic() - started < 0.6 + 5 + 2  # the run's bound: timeout + cleanup_timeout
    await wait_until(lambda: not desk["open"], timeout=7)
    assert len(desk["created"]) == 1 and desk["deletes_started"] == 1


async def test_cancelling_a_run_during_its_cleanup_waits_for_the_cleanup_then_propagates(slow_desk) -> None:  # type: ignore[no-untyped-def]
    desk, base = slow_desk
    task = asyncio.create_task(run(submit_then_delete(base)))
    await wait_until(lambda: desk["deletes_started"] == 1, timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert desk["created"] and not desk["open"]


async def test_a_second_cancellation_leaves_the_cleanup_running_and_close_waits_for_it(slow_desk) -> None:  # type: ignore[no-untyped-def]
    desk, base = slow_desk
    probe = TransactionProbe(submit_then_delete(base))
    task = asyncio.create_task(run_once(probe, 20.0, Scrubber()))
    await wait_until(lambda: desk["deletes_started"] == 1, timeout=5)
    task.cancel()
    await asyncio.sleep(0.05)
    task.cancel()  # a second SIGTERM: stop waiting, not cleaning
    with pytest.raises(asyncio.CancelledError):
        await task
    assert desk["open"], "the run waited for the whole delete although it was cancelled twice"
    await asyncio.wait_for(probe.close(), timeout=5 + 2)  # close() waits for the cleanup still running
    assert not desk["open"]


# --- cookies: one jar per run, for the platform's origin only ---------------------------------------------------

LOGIN_DESK = web.AppKey("login_desk", dict)


def _session_of(request: web.Request) -> str | None:
    session = request.cookies.get("session")
    return session if session in request.app[LOGIN_DESK]["sessions"] else None


async def _login(request: web.Request) -> web.Response:
    desk = request.app[LOGIN_DESK]
    desk["login_cookies"].append(request.headers.get("Cookie"))
    session = secrets.token_hex(16)
    desk["sessions"][session] = secrets.token_hex(16)  # the session's CSRF token
    response = web.json_response({"ok": True})
    response.set_cookie("session", session, httponly=True, path="/")
    return response


async def _form(request: web.Request) -> web.Response:
    session = _session_of(request)
    if session is None:
        return web.json_response({"error": "log in first"}, status=401)
    return web.json_response({"csrf": request.app[LOGIN_DESK]["sessions"][session]})


async def _submit(request: web.Request) -> web.Response:
    session = _session_of(request)
    if session is None:
        return web.json_response({"error": "log in first"}, status=401)
    if request.headers.get("X-CSRF-Token") != request.app[LOGIN_DESK]["sessions"][session]:
        return web.json_response({"error": "bad CSRF token"}, status=403)
    return web.json_response({"ticket_id": "t1"}, status=201)


async def _whoami(request: web.Request) -> web.Response:
    # Echoes the credentials it got: a platform's debug page, or a check whose "got" would show them.
    return web.json_response({"session": request.cookies.get("session"), "csrf": request.headers.get("X-CSRF-Token")})


async def _redirect_away(request: web.Request) -> web.Response:
    raise web.HTTPFound(request.query["to"])


def _login_app() -> web.Application:
    app = web.Application()
    app[LOGIN_DESK] = {"sessions": {}, "login_cookies": []}
    app.router.add_post("/login", _login)
    app.router.add_get("/form", _form)
    app.router.add_post("/submit", _submit)
    app.router.add_get("/whoami", _whoami)
    app.router.add_get("/away", _redirect_away)
    return app


COOKIE_SEEN = web.AppKey("cookie_seen", list)


async def _record_cookie(request: web.Request) -> web.Response:
    request.app[COOKIE_SEEN].append(request.headers.get("Cookie"))
    return web.json_response({})


@pytest.fixture
async def login_desk():  # type: ignore[no-untyped-def]
    app = _login_app()
    runner, url = await start_app(app)  # an IP-literal host (127.0.0.1), whose cookies aiohttp refuses by default
    try:
        yield app[LOGIN_DESK], url
    finally:
        await runner.cleanup()


@pytest.fixture
async def other_servers():  # type: ignore[no-untyped-def]
    """Two servers that record the Cookie header they get: another port of 127.0.0.1, and `localhost`."""
    apps, runners = [], []
    for _ in range(2):
        app = web.Application()
        app[COOKIE_SEEN] = []
        app.router.add_get("/echo", _record_cookie)
        runner, _ = await start_app(app)
        apps.append(app)
        runners.append(runner)
    port = [runner.addresses[0][1] for runner in runners]
    try:
        yield {"same_host_other_port": (apps[0], f"http://127.0.0.1:{port[0]}"),
               "localhost": (apps[1], f"http://localhost:{port[1]}")}
    finally:
        for runner in runners:
            await runner.cleanup()


LOGIN_STEPS: list[dict[str, Any]] = [
    {"name": "login", "method": "POST", "url": "/login", "form": {"user": "canary", "password": "pw-8c1d2e"}},
    {"name": "form", "url": "/form", "extract": {"csrf": "csrf"}},
    {"name": "submit", "method": "POST", "url": "/submit", "headers": {"X-CSRF-Token": "{csrf}"},
     "json": {"subject": "[canary] {run_id}"}, "expect_status": [201], "expect": ["ticket_id exists"]},
]


def login_flow(base: str, *extra_steps: dict[str, Any]) -> TransactionSettings:
    return TransactionSettings.model_validate({
        "name": "login-form", "type": "transaction", "channel": "web_form", "interval": "1m", "timeout": "10s",
        "base_url": base, "steps": [*LOGIN_STEPS, *extra_steps],
    })


async def test_a_login_then_form_flow_carries_the_session_cookie_and_the_csrf_token(login_desk) -> None:  # type: ignore[no-untyped-def]
    desk, base = login_desk
    result = await run(login_flow(base))

    assert result.success, result.message
    assert set(result.phases) == {"login", "form", "submit"}
    assert len(desk["sessions"]) == 1


async def test_every_run_starts_with_an_empty_cookie_jar(login_desk) -> None:  # type: ignore[no-untyped-def]
    desk, base = login_desk
    probe = TransactionProbe(login_flow(base))
    try:
        first = await run_once(probe, 10.0, Scrubber())
        second = await run_once(probe, 10.0, Scrubber())
    finally:
        await probe.close()

    assert first.success and second.success, (first.message, second.message)
    assert desk["login_cookies"] == [None, None]  # the second login did not send the first run's session


async def test_cookies_never_cross_to_another_origin(login_desk, other_servers) -> None:  # type: ignore[no-untyped-def]
    _, base = login_desk
    other_port_app, other_port = other_servers["same_host_other_port"]
    localhost_app, localhost = other_servers["localhost"]
    steps = [
        {"name": "other_port", "url": f"{other_port}/echo"},
        {"name": "other_host", "url": f"{localhost}/echo"},
        {"name": "redirected", "url": "/away?to=" + quote(f"{other_port}/echo", safe="")},
        {"name": "back_home", "url": "/whoami", "expect": ["session exists"]},
    ]
    result = await run(login_flow(base, *steps))

    assert result.success, result.message  # back_home: the platform itself still got its cookie
    assert other_port_app[COOKIE_SEEN] == [None, None]  # neither asked directly nor through the redirect
    assert localhost_app[COOKIE_SEEN] == [None]


async def test_cookies_and_secret_header_values_never_appear_in_messages(login_desk) -> None:  # type: ignore[no-untyped-def]
    desk, base = login_desk
    whoami = {"name": "whoami", "url": "/whoami", "headers": {"X-CSRF-Token": "{csrf}"},
              "expect": ['session == "nobody"', 'csrf == "none"']}
    result = await run(login_flow(base, whoami))

    assert result.reason == "assertion"
    [(session, csrf)] = desk["sessions"].items()
    texts = [result.message, *(check.text for check in result.checks)]
    assert not any(session in text or csrf in text for text in texts), texts
    assert '[whoami] session == "nobody" (got "***")' in result.message
    assert "pw-8c1d2e" in login_flow(base).secret_values()  # the login form's password is a config secret


async def test_connection_refused_names_the_step() -> None:
    result = await run(web_form(f"http://127.0.0.1:{free_port()}"))
    assert result.reason == "connect" and result.message.startswith("step submit: cannot connect")


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"steps": [{"name": "a", "url": "/t/{ticket_id}"}]}, "step 'a' uses ticket_id before any earlier step extracts it"),
        ({"base_url": ""}, "step 'submit' has a relative url but no base_url is set"),
        ({"cleanup": [{"name": "submit", "method": "DELETE", "url": "/x"}]}, "step names must be unique (repeated: submit)"),
        ({"cleanup": [{"name": "undo", "method": "DELETE", "url": "/x/{nope}"}]}, "cleanup step 'undo' uses nope, which no step extracts"),
        ({"steps": [{"name": "a", "url": "/x", "expect": ["status === 1"]}]}, "condition 'status === 1'"),
        ({"steps": [{"name": "a", "url": "/x", "extract": {"run_id": "id"}}]}, "variable name 'run_id' is built in"),
    ],
)
def test_invalid_transactions_are_refused_at_load(change: dict, error: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValidationError) as caught:
        web_form("http://127.0.0.1:1", **change)
    assert error in str(caught.value)


def test_sigterm_mid_transaction_still_deletes_the_ticket(tmp_path: Path, sandbox_process: str) -> None:
    def call(path: str, data: dict | None = None) -> dict:  # type: ignore[type-arg]
        request = urllib.request.Request(f"{sandbox_process}{path}", method="POST" if data is not None else "GET",
                                         data=json.dumps(data).encode() if data is not None else None)
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    call("/_sandbox/faults", {"agent": "stalled"})
    config = write_config(tmp_path, f"""
        [daemon]
        jitter = "1ms"
        shutdown_grace = "500ms"

        [[probes]]
        name = "web-form"
        type = "transaction"
        channel = "web_form"
        interval = "1m"
        timeout = "30s"
        base_url = "{sandbox_process}"

        [[probes.steps]]
        name = "submit"
        method = "POST"
        url = "/support/submit"
        json = {{ name = "Canary", email = "canary@example.com", subject = "[canary]", message = "synthetic" }}
        extract = {{ ticket_id = "ticket_id" }}

        [[probes.steps]]
        name = "agent_reply"
        url = "/support/ticket/{{ticket_id}}"
        expect = ['status != "open"']
        poll = {{ every = "200ms", within = "25s" }}

        [[probes.cleanup]]
        name = "delete_ticket"
        method = "DELETE"
        url = "/support/ticket/{{ticket_id}}"
    """)
    port = free_port()
    daemon = Process(probe_command("run", "--config", str(config), "--listen", f"127.0.0.1:{port}"), cwd=ROOT)
    try:
        wait_for_port(port, daemon)
        deadline = time.monotonic() + 10
        while not call("/_sandbox/tickets")["tickets"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert call("/_sandbox/tickets")["tickets"], f"the canary never submitted its ticket:\n{daemon.output()}"
        daemon.popen.send_signal(signal.SIGTERM)
        assert daemon.popen.wait(timeout=10) == 0
        assert call("/_sandbox/tickets")["tickets"] == []
    finally:
        daemon.stop()
