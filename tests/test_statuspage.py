"""The `statuspage` probe against the sandbox's Statuspage stand-in (and a tiny server for odd answers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from canary.config import ConfigError, load_config
from canary.contract import Result
from canary.runner import run_once
from canary.scrub import Scrubber
from probes import PROBE_TYPES
from probes.statuspage import StatuspageProbe, StatuspageSettings
from tests.conftest import free_port, start_app, write_config

Sandbox = tuple[web.Application, str]


async def set_faults(base: str, **faults: Any) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/_sandbox/faults", json=faults) as response:
            assert response.status == 200, await response.text()


async def probe_once(url: str, **fields: Any) -> Result:
    settings = StatuspageSettings.model_validate(
        {"name": "groq-status", "type": "statuspage", "channel": "ai", "interval": "1m", "timeout": "2s", "url": url, **fields}
    )
    probe = StatuspageProbe(settings)
    try:
        return await run_once(probe, 2.0, Scrubber())
    finally:
        await probe.close()


def indicator(result: Result) -> float | None:
    values = [g.value for g in result.gauges if g.name == "statuspage_indicator"]
    return values[0] if values else None


async def test_operational_page_passes_with_indicator_zero(sandbox: Sandbox) -> None:
    _, base = sandbox
    result = await probe_once(f"{base}/statuspage")
    assert result.success, result.message
    assert result.message == "the provider reports none: All Systems Operational"
    assert indicator(result) == 0
    assert set(result.phases) == {"fetch"}


@pytest.mark.parametrize(("state", "level", "passes", "description"), [
    ("none", 0, True, "All Systems Operational"),
    ("minor", 1, True, "Minor Service Outage"),
    ("maintenance", 1, True, "Service Under Maintenance"),
    ("major", 2, False, "Partial System Outage"),
    ("critical", 3, False, "Major System Outage"),
])
async def test_indicators_map_to_0_3_and_fail_from_major(
    sandbox: Sandbox, state: str, level: int, passes: bool, description: str
) -> None:
    _, base = sandbox
    await set_faults(base, statuspage_indicator=state)
    result = await probe_once(f"{base}/statuspage")
    assert indicator(result) == level
    assert result.success is passes
    assert result.reason == ("ok" if passes else "assertion")
    assert description in result.message and state in result.message
    if not passes:
        assert "fails at major or worse" in result.message


@pytest.mark.parametrize(("fail_at", "state", "passes"), [
    ("minor", "none", True),
    ("minor", "minor", False),
    ("minor", "maintenance", False),
    ("critical", "major", True),
    ("critical", "critical", False),
])
async def test_fail_at_moves_the_threshold(sandbox: Sandbox, fail_at: str, state: str, passes: bool) -> None:
    _, base = sandbox
    await set_faults(base, statuspage_indicator=state)
    result = await probe_once(f"{base}/statuspage", fail_at=fail_at)
    assert result.success is passes, result.message
    if not passes:
        assert result.reason == "assertion" and f"fails at {fail_at} or worse" in result.message


@pytest.mark.parametrize("suffix", ["/statuspage", "/statuspage/", "/statuspage/api/v2/status.json"])
async def test_page_url_or_status_json_url_both_work(sandbox: Sandbox, suffix: str) -> None:
    _, base = sandbox
    await set_faults(base, statuspage_indicator="minor")
    result = await probe_once(base + suffix)
    assert indicator(result) == 1


def test_status_url_and_target() -> None:
    settings = StatuspageSettings(name="s", channel="ai", url="https://groqstatus.com")
    assert str(settings.status_url()) == "https://groqstatus.com/api/v2/status.json"
    assert settings.target() == "GET https://groqstatus.com/api/v2/status.json"
    assert settings.fail_at == "major"


async def test_not_found_fails_status(sandbox: Sandbox) -> None:
    _, base = sandbox
    result = await probe_once(f"{base}/nowhere")
    assert result.reason == "status" and "HTTP 404" in result.message
    assert indicator(result) is None


async def test_nothing_listening_fails_connect() -> None:
    result = await probe_once(f"http://127.0.0.1:{free_port()}")
    assert result.reason == "connect"


@pytest.fixture
async def odd_page() -> AsyncIterator[str]:
    """A server answering the body given in `?body=`, verbatim, as JSON."""
    async def _answer(request: web.Request) -> web.Response:
        return web.Response(text=request.query["body"], content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/v2/status.json", _answer)
    runner, base = await start_app(app)
    try:
        yield base
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("body", "says"), [
    ("<html>maintenance page</html>", "Statuspage shape"),
    ('{"status": "ok"}', "Statuspage shape"),
    ('{"page": {}}', "Statuspage shape"),
    ('{"status": {"indicator": "purple", "description": "Odd"}}', "unknown indicator 'purple' (Odd)"),
])
async def test_unexpected_answers_fail_assertion(odd_page: str, body: str, says: str) -> None:
    result = await probe_once(str(URL(f"{odd_page}/api/v2/status.json").with_query(body=body)))
    assert result.reason == "assertion"
    assert says in result.message
    assert indicator(result) is None


async def test_a_long_description_is_bounded(odd_page: str) -> None:
    body = '{"status": {"indicator": "critical", "description": "' + "Outage " * 500 + '"}}'
    result = await probe_once(str(URL(f"{odd_page}/api/v2/status.json").with_query(body=body)))
    assert result.reason == "assertion" and indicator(result) == 3
    assert len(result.message) < 300


SHIPPED_SNIPPET = """
[[probes]]
name = "llm-provider-status"
type = "statuspage"
channel = "ai_agent"
description = "The LLM provider's own status page reports no major outage"
url = "${STATUSPAGE_URL:-http://127.0.0.1:8000/statuspage}"
interval = "2m"
timeout = "10s"
fail_at = "major"
"""


def test_shipped_snippet_loads_with_sandbox_default(tmp_path: Path) -> None:
    (probe,) = load_config(write_config(tmp_path, SHIPPED_SNIPPET), PROBE_TYPES, environ={}).probes
    assert isinstance(probe, StatuspageSettings)
    assert str(probe.status_url()) == "http://127.0.0.1:8000/statuspage/api/v2/status.json"
    assert probe.channel == "ai_agent"
    environ = {"STATUSPAGE_URL": "https://groqstatus.com/api/v2/status.json"}
    (live,) = load_config(write_config(tmp_path, SHIPPED_SNIPPET), PROBE_TYPES, environ=environ).probes
    assert str(live.status_url()) == "https://groqstatus.com/api/v2/status.json"


@pytest.mark.parametrize(("extra", "problem"), [
    ('url = "groqstatus.com"\n', "probes[0].url: must be an absolute http:// or https:// URL"),
    ('url = "https://groqstatus.com"\nfail_at = "none"\n', "probes[0].fail_at"),
    ('url = "https://groqstatus.com"\nindicator = "x"\n', "probes[0].indicator: unknown key"),
])
def test_bad_settings_are_refused_at_load(tmp_path: Path, extra: str, problem: str) -> None:
    body = '[[probes]]\nname = "s"\ntype = "statuspage"\nchannel = "ai"\n' + extra
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, body), PROBE_TYPES, environ={})
    assert problem in str(caught.value)
