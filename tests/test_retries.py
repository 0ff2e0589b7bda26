"""`retries`: a transient failure is tried again within the probe's timeout, never a failure another attempt cannot
change; real servers on 127.0.0.1 misbehave, the runner decides, and the daemon exports the attempts."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from canary.config import load_config
from canary.contract import NEVER_RETRIED, TRANSIENT_REASONS, PhaseTimer, Probe, ProbeSettings, Result
from canary.runner import run_once
from canary.scrub import Scrubber
from probes import PROBE_TYPES
from probes.http import HttpProbe, HttpSettings
from probes.transaction import TransactionProbe, TransactionSettings
from tests.conftest import ROOT, Process, free_port, http_get, probe_command, wait_for, wait_for_port, write_config
from tests.hostile import Servers, answer, in_turn, never_answer, raw_answer, reset

TIMEOUT = 5.0  # the probes' timeout: room for a few backoffs on a loaded machine
MARGIN = 2.0  # how much later than its timeout a run may end on a loaded machine
OK = raw_answer(answer("200 OK", "Content-Type: application/json\r\n", b'{"status": "ok"}'))
UNAVAILABLE = raw_answer(answer("503 Service Unavailable"))


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    started = Servers()
    try:
        yield started
    finally:
        await started.close()


async def run_http(url: str, retries: int, timeout: float = TIMEOUT) -> tuple[Result, float]:
    """One run of an http probe through the runner; the result and how long it took, end to end."""
    probe = HttpProbe(HttpSettings.model_validate({
        "name": "flaky", "type": "http", "channel": "api", "interval": "1m", "timeout": f"{timeout}s",
        "retries": retries, "url": url,
    }))
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        result = await run_once(probe, timeout, Scrubber())
    finally:
        await probe.close()
    return result, loop.time() - started


# --- what is retried ------------------------------------------------------------------------------------------------


# aiohttp itself sends an idempotent request once more after a reset (RFC 9112), so a failed attempt costs two.
@pytest.mark.parametrize(("failure", "reason", "connections_per_attempt"), [(UNAVAILABLE, "status", 1), (reset(), "connect", 2)],
                         ids=["503", "reset"])
async def test_a_transient_failure_is_retried_until_the_answer_passes(
    servers: Servers, failure: Any, reason: str, connections_per_attempt: int
) -> None:
    server = await servers.raw(in_turn(*[failure] * (2 * connections_per_attempt), OK))
    result, elapsed = await run_http(server.url, retries=2)

    assert result.success, result.message
    assert result.attempts == 3 and server.connections == 2 * connections_per_attempt + 1
    assert result.message.endswith(f"(attempt 3 of 3; earlier: {reason}, {reason})")
    # Two backoffs were slept (at least 0.25 s and 0.5 s), and the run, all of it, stayed within its timeout.
    assert 0.75 <= result.duration_seconds <= elapsed < TIMEOUT + MARGIN


async def test_without_retries_the_first_failure_is_the_result(servers: Servers) -> None:
    server = await servers.raw(in_turn(UNAVAILABLE, OK))
    result, _ = await run_http(server.url, retries=0)
    assert (result.reason, result.attempts, server.connections) == ("status", 1, 1)
    assert "attempt" not in result.message


async def test_when_the_attempts_run_out_the_last_failure_is_reported(servers: Servers) -> None:
    server = await servers.raw(UNAVAILABLE)
    result, elapsed = await run_http(server.url, retries=2)
    assert (result.reason, result.attempts, server.connections) == ("status", 3, 3)
    assert result.message.startswith("HTTP 503 Service Unavailable, expected 2xx")
    assert result.message.endswith("(attempt 3 of 3; earlier: status, status)")
    assert elapsed < TIMEOUT + MARGIN


async def test_a_401_is_never_retried(servers: Servers) -> None:
    server = await servers.raw(in_turn(raw_answer(answer("401 Unauthorized")), OK))
    result, _ = await run_http(server.url, retries=3)
    assert (result.reason, result.attempts, server.connections) == ("status", 1, 1)


async def test_a_429_is_retried_after_its_retry_after_when_that_fits(servers: Servers) -> None:
    server = await servers.raw(in_turn(raw_answer(answer("429 Too Many Requests", "Retry-After: 1\r\n")), OK))
    result, elapsed = await run_http(server.url, retries=2)
    assert result.success and result.attempts == 2 and server.connections == 2, result.message
    assert 1.0 <= result.duration_seconds <= elapsed < TIMEOUT + MARGIN  # waited as asked, not just the backoff


async def test_a_429_whose_retry_after_is_longer_than_the_budget_is_not_retried(servers: Servers) -> None:
    server = await servers.raw(in_turn(raw_answer(answer("429 Too Many Requests", "Retry-After: 30\r\n")), OK))
    result, elapsed = await run_http(server.url, retries=3, timeout=3.0)
    assert (result.reason, result.attempts, server.connections) == ("status", 1, 1)
    assert "not tried again: the next attempt, 30s away, would not fit the 3s timeout" in result.message
    assert elapsed < 3.0  # it neither slept the 30 s nor waited out its budget


# --- the budget -----------------------------------------------------------------------------------------------------


async def test_retries_never_take_a_run_past_its_timeout(servers: Servers) -> None:
    timeout = 2.0
    server = await servers.raw(UNAVAILABLE)
    result, elapsed = await run_http(server.url, retries=5, timeout=timeout)
    assert result.reason == "status" and 2 <= result.attempts < 6  # the budget ended it, not the count
    assert "would not fit the 2s timeout" in result.message
    assert result.duration_seconds <= elapsed < timeout + MARGIN


async def test_an_attempt_gets_only_what_is_left_of_the_timeout(servers: Servers) -> None:
    """A quick 503, then a target that never answers: the second attempt times out when the run's budget ends."""
    timeout = 2.0
    server = await servers.raw(in_turn(UNAVAILABLE, never_answer()))
    result, elapsed = await run_http(server.url, retries=3, timeout=timeout)
    assert (result.reason, result.attempts, server.connections) == ("timeout", 2, 2)
    assert result.message.endswith("(attempt 2 of 4; earlier: status)")
    assert timeout * 0.9 <= result.duration_seconds <= elapsed < timeout + MARGIN


class Scripted(ProbeSettings):
    type: Literal["scripted"] = "scripted"
    reason: str = "connect"


class ScriptedProbe(Probe[Scripted]):
    """Fails with the configured reason, marked transient by `retry_after` too, then passes."""

    settings_model = Scripted

    def __init__(self, settings: Scripted) -> None:
        super().__init__(settings)
        self.runs = 0

    async def run(self, timer: PhaseTimer) -> Result:
        self.runs += 1
        if self.runs == 1:
            return Result.fail(self.settings.reason, "first run fails", retry_after=0.0)
        return Result.ok("passed")


@pytest.mark.parametrize("reason", sorted(NEVER_RETRIED | TRANSIENT_REASONS))
async def test_refused_credentials_failed_checks_and_holes_are_never_retried(reason: str) -> None:
    probe = ScriptedProbe(Scripted.model_validate(
        {"name": "scripted", "channel": "api", "timeout": f"{TIMEOUT}s", "retries": 2, "reason": reason}))
    result = await run_once(probe, TIMEOUT, Scrubber())
    if reason in NEVER_RETRIED:  # whatever the probe says about it
        assert (result.reason, result.attempts, probe.runs) == (reason, 1, 1)
    else:
        assert (result.success, result.attempts, probe.runs) == (True, 2, 2)


# --- cleanup between attempts ---------------------------------------------------------------------------------------


def ticket_platform(tickets: set[str], events: list[tuple[str, ...]]) -> web.Application:
    """Tickets: the first look at any ticket answers 503, later ones 200; every request is noted in `events`."""
    looked = 0

    async def submit(request: web.Request) -> web.Response:
        ticket = f"T{len(events)}"
        tickets.add(ticket)
        events.append(("submit", ticket))
        return web.json_response({"ticket_id": ticket}, status=201)

    async def look(request: web.Request) -> web.Response:
        nonlocal looked
        looked += 1
        status = 503 if looked == 1 else 200
        events.append(("look", request.match_info["ticket"], str(status)))
        return web.json_response({"status": "responded"}, status=status)

    async def delete(request: web.Request) -> web.Response:
        tickets.discard(request.match_info["ticket"])
        events.append(("delete", request.match_info["ticket"]))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/submit", submit)
    app.router.add_get("/ticket/{ticket}", look)
    app.router.add_delete("/ticket/{ticket}", delete)
    return app


async def test_a_transaction_cleans_up_after_each_failed_attempt(servers: Servers) -> None:
    tickets: set[str] = set()
    events: list[tuple[str, ...]] = []
    base = await servers.app(ticket_platform(tickets, events))
    probe = TransactionProbe(TransactionSettings.model_validate({
        "name": "form", "type": "transaction", "channel": "web_form", "timeout": f"{TIMEOUT}s", "retries": 2,
        "base_url": base,
        "steps": [{"name": "submit", "method": "POST", "url": "/submit", "json": {"subject": "[canary] {run_id}"},
                   "extract": {"ticket_id": "ticket_id"}},
                  {"name": "look", "url": "/ticket/{ticket_id}"}],
        "cleanup": [{"name": "delete", "method": "DELETE", "url": "/ticket/{ticket_id}"}],
    }))
    started = asyncio.get_running_loop().time()
    try:
        result = await run_once(probe, TIMEOUT, Scrubber())
    finally:
        await probe.close()

    assert result.success and result.attempts == 2, result.message
    assert asyncio.get_running_loop().time() - started < TIMEOUT + MARGIN
    first, second = events[0][1], events[3][1]
    assert events == [("submit", first), ("look", first, "503"), ("delete", first),
                      ("submit", second), ("look", second, "200"), ("delete", second)]
    assert tickets == set()


# --- config ---------------------------------------------------------------------------------------------------------


def test_retries_come_from_the_daemon_unless_a_probe_sets_its_own(tmp_path: Path) -> None:
    probe = '[[probes]]\nname = "{name}"\ntype = "http"\nchannel = "api"\nurl = "http://127.0.0.1:1/"\n'
    path = write_config(tmp_path, "[daemon]\nretries = 2\n" + probe.format(name="a") + probe.format(name="b")
                        + "retries = 0\n")
    a, b = load_config(path, PROBE_TYPES, environ={}).probes
    assert (a.retries, b.retries) == (2, 0)
    plain = write_config(tmp_path, probe.format(name="c"), name="plain.toml")
    assert load_config(plain, PROBE_TYPES, environ={}).probes[0].retries == 0


# --- the daemon -------------------------------------------------------------------------------------------------------


def sample_of(base: str, name: str, probe: str) -> float | None:
    _, text = http_get(f"{base}/metrics")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("probe") == probe:
                return sample.value
    return None


def attempts_of(base: str, probe: str) -> float | None:
    return sample_of(base, "canary_probe_attempts", probe)


def success_of(base: str, probe: str) -> float | None:
    return sample_of(base, "canary_probe_success", probe)


def set_faults(platform: str, faults: dict[str, Any]) -> None:
    request = urllib.request.Request(f"{platform}/_sandbox/faults", data=json.dumps(faults).encode(), method="POST")
    urllib.request.urlopen(request, timeout=5).close()


def test_the_daemon_exports_how_many_attempts_each_run_made(tmp_path: Path, sandbox_process: str) -> None:
    port = free_port()
    path = write_config(tmp_path, f"""
        [daemon]
        interval = "3s"
        timeout = "2500ms"
        jitter = "100ms"
        retries = 2

        [[probes]]
        name = "api-health"
        type = "http"
        channel = "api"
        url = "{sandbox_process}/health"

        [[probes]]
        name = "faults"
        type = "http"
        channel = "api"
        url = "{sandbox_process}/_sandbox/faults"
        retries = 0
    """)
    process = Process(probe_command("run", "--config", str(path), "--listen", f"127.0.0.1:{port}"), cwd=ROOT)
    try:
        wait_for_port(port, process)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: attempts_of(base, "api-health") == 1, 30, "a first run of api-health, passing at once")
        # One 503 (a blip): the next run passes on its second attempt.
        set_faults(sandbox_process, {"health_unavailable": 1})
        wait_for(lambda: attempts_of(base, "api-health") == 2, 30, "api-health passing on its second attempt")
        assert success_of(base, "api-health") == 1
        # Every request fails: the run gives up after its three attempts.
        set_faults(sandbox_process, {"health_unavailable": 1000})
        wait_for(lambda: attempts_of(base, "api-health") == 3, 30, "api-health failing after 3 attempts")
        assert success_of(base, "api-health") == 0
        _, status = http_get(f"{base}/status.json")
        assert {p["name"]: p["attempts"] for p in json.loads(status)["probes"]} == {"api-health": 3, "faults": 1}
        set_faults(sandbox_process, {"health_unavailable": 0})
        wait_for(lambda: attempts_of(base, "api-health") == 1, 30, "api-health back at 1 attempt")
    finally:
        process.stop()
