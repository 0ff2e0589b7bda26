"""The `llm` probe against the sandbox's Groq stand-in on 127.0.0.1: model list, 1-token completion, rate limits."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from canary.config import ConfigError, load_config
from canary.contract import Result
from canary.runner import run_once
from canary.sandbox import build_sandbox_app
from canary.sandbox.llm import DEFAULT_API_KEY, REQUEST_LIMIT, TOKEN_LIMIT
from canary.scrub import Scrubber
from probes import PROBE_TYPES
from probes.llm import DEFAULT_MODEL, LlmProbe, LlmSettings, parse_reset, parse_retry_after
from tests.conftest import free_port, start_app, write_config

Sandbox = tuple[web.Application, str]


# --- helpers ------------------------------------------------------------------------------------------------------


async def set_faults(base: str, **faults: Any) -> None:
    """Switches sandbox faults the way an operator would: POST /_sandbox/faults."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/_sandbox/faults", json=faults) as response:
            assert response.status == 200, await response.text()


async def received(base: str) -> list[dict[str, Any]]:
    """What reached the sandbox's LLM stand-in, from its own request log."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/_sandbox/llm/requests") as response:
            return (await response.json())["requests"]


def make_probe(base: str, **fields: Any) -> LlmProbe:
    settings = LlmSettings.model_validate({
        "name": "groq", "type": "llm", "channel": "ai", "interval": "1m",
        "base_url": f"{base}/llm/openai/v1", "api_key": DEFAULT_API_KEY, "slow_after": "1s", "timeout": "3s",
        **fields,
    })
    return LlmProbe(settings)


async def probe_once(base: str, run_timeout: float = 3.0, **fields: Any) -> Result:
    """One run through the runner with an empty scrubber, so only the probe itself keeps secrets out."""
    probe = make_probe(base, **fields)
    try:
        return await run_once(probe, run_timeout, Scrubber())
    finally:
        await probe.close()


def gauges(result: Result) -> dict[tuple[str, str], float]:
    return {(g.name, dict(g.labels).get("kind", "")): g.value for g in result.gauges}


# --- healthy ------------------------------------------------------------------------------------------------------


async def test_healthy_run_lists_the_model_times_one_token_and_exports_rate_limits(sandbox: Sandbox) -> None:
    _, base = sandbox
    result = await probe_once(base)

    assert result.success, result.message
    assert result.reason == "ok"
    assert DEFAULT_MODEL in result.message and "1 token" in result.message
    assert set(result.phases) == {"models", "completion"}
    figures = gauges(result)
    assert figures[("llm_ratelimit_limit", "requests")] == REQUEST_LIMIT
    assert figures[("llm_ratelimit_limit", "tokens")] == TOKEN_LIMIT
    assert figures[("llm_ratelimit_remaining", "requests")] == REQUEST_LIMIT - 2  # two calls served this run
    assert figures[("llm_ratelimit_reset_seconds", "requests")] == pytest.approx(179.56)
    assert figures[("llm_ratelimit_reset_seconds", "tokens")] == pytest.approx(0.083)
    assert figures[("llm_ratelimit_headroom_ratio", "tokens")] == pytest.approx((TOKEN_LIMIT - 25) / TOKEN_LIMIT)
    assert figures[("llm_backoff_seconds", "")] == 0
    assert {kind for _, kind in figures} <= {"requests", "tokens", ""}  # the label stays bounded

    calls = await received(base)
    assert [(c["method"], c["path"]) for c in calls] == [
        ("GET", "/llm/openai/v1/models"), ("POST", "/llm/openai/v1/chat/completions")]
    assert all(c["authorized"] and c["synthetic"] for c in calls)
    assert calls[1]["json"] == {
        "model": DEFAULT_MODEL, "max_tokens": 1, "temperature": 0,
        "messages": [{"role": "user", "content": LlmSettings.model_fields["prompt"].default}],
    }


async def test_prompt_and_model_come_from_settings(sandbox: Sandbox) -> None:
    _, base = sandbox
    result = await probe_once(base, model="llama-3.1-8b-instant", prompt="canary ping")
    assert result.success, result.message
    sent = (await received(base))[-1]["json"]
    assert (sent["model"], sent["messages"][0]["content"]) == ("llama-3.1-8b-instant", "canary ping")


# --- each runbook failure -----------------------------------------------------------------------------------------


async def test_unauthorized_fails_auth_without_calling_completions(sandbox: Sandbox) -> None:
    _, base = sandbox
    await set_faults(base, llm="unauthorized")
    result = await probe_once(base)
    assert result.reason == "auth"
    assert "refused the API key" in result.message and "HTTP 401 on GET /models" in result.message
    assert "invalid_api_key" in result.message
    assert [c["path"] for c in await received(base)] == ["/llm/openai/v1/models"]


async def test_a_wrong_key_is_refused_by_the_sandbox_itself(sandbox: Sandbox) -> None:
    _, base = sandbox
    result = await probe_once(base, api_key="gsk_not-the-right-key")
    assert result.reason == "auth"
    assert (await received(base))[0]["authorized"] is False


async def test_rate_limited_fails_with_retry_after_and_zero_remaining(sandbox: Sandbox) -> None:
    _, base = sandbox
    await set_faults(base, llm="rate_limited", llm_retry_after_seconds=30)
    result = await probe_once(base)
    assert result.reason == "rate_limited"
    assert "HTTP 429 on GET /models" in result.message
    assert "rate_limit_exceeded" in result.message and "retry-after 30s" in result.message
    figures = gauges(result)
    assert figures[("llm_ratelimit_remaining", "requests")] == 0
    assert figures[("llm_ratelimit_headroom_ratio", "requests")] == 0
    assert 29 <= figures[("llm_backoff_seconds", "")] <= 30


async def test_low_headroom_fails_rate_limited_naming_the_kind(sandbox: Sandbox) -> None:
    _, base = sandbox
    await set_faults(base, llm="low_headroom")
    result = await probe_once(base)
    assert result.reason == "rate_limited"
    assert f"requests headroom 7 of {REQUEST_LIMIT}" in result.message and "min_headroom 10%" in result.message
    assert "resets in 2m59s" in result.message  # from "2m59.56s"
    assert "tokens headroom" not in result.message
    assert gauges(result)[("llm_ratelimit_headroom_ratio", "requests")] == pytest.approx(7 / REQUEST_LIMIT)
    # The same answer passes when no floor is set: the failure really comes from min_headroom.
    assert (await probe_once(base, min_headroom=0)).success


async def test_model_missing_from_the_list_names_the_nearest_ids(sandbox: Sandbox) -> None:
    _, base = sandbox
    await set_faults(base, llm="model_missing")
    result = await probe_once(base)
    assert result.reason == "model_missing"
    assert f"model {DEFAULT_MODEL} is not among the 4 models" in result.message
    assert "nearest:" in result.message
    assert [c["path"] for c in await received(base)] == ["/llm/openai/v1/models"]  # no completion attempted


async def test_a_mistyped_model_shows_the_right_spelling(sandbox: Sandbox) -> None:
    _, base = sandbox
    result = await probe_once(base, model="llama-3.3-70b-versatle")
    assert result.reason == "model_missing"
    assert "llama-3.3-70b-versatile" in result.message.split("nearest:")[1]
    assert "not among the 5 models" in result.message


async def test_nearest_ids_stay_bounded_when_the_provider_serves_many(serve_llm) -> None:  # type: ignore[no-untyped-def]
    ids = [f"vendor/model-{n:04d}-{'x' * 150}" for n in range(500)]
    base = await serve_llm(models={"object": "list", "data": [{"id": i, "object": "model"} for i in ids]})
    result = await probe_once(base, base_url=base, model="vendor/model-0007")
    assert result.reason == "model_missing"
    assert "500 models" in result.message
    assert len(result.message) < 450
    assert result.message.count("vendor/model-") == 1 + 3  # the configured id, then the nearest three


async def test_model_refused_by_completions_is_model_missing(sandbox: Sandbox) -> None:
    _, base = sandbox
    await set_faults(base, llm="model_unavailable")
    result = await probe_once(base)
    assert result.reason == "model_missing"
    assert "HTTP 404 on POST /chat/completions" in result.message and "model_not_found" in result.message
    assert "does not exist or you do not have access" in result.message


async def test_inactive_model_is_model_missing(serve_llm) -> None:  # type: ignore[no-untyped-def]
    listed = {"object": "list", "data": [{"id": DEFAULT_MODEL, "object": "model", "active": False}]}
    base = await serve_llm(models=listed)
    result = await probe_once(base, base_url=base)
    assert result.reason == "model_missing" and "inactive" in result.message


async def test_slow_completion_fails_slow_with_the_answer_received(sandbox: Sandbox) -> None:
    _, base = sandbox
    await set_faults(base, llm="slow", llm_slow_seconds=0.5)
    result = await probe_once(base, slow_after="200ms", timeout="2s")
    assert result.reason == "slow"
    assert "over slow_after 200ms" in result.message
    assert result.phases["completion"] >= 0.5
    assert gauges(result)[("llm_ratelimit_limit", "requests")] == REQUEST_LIMIT  # the answer did come
    # Under the limit it passes: slow_after decides, not the delay alone.
    assert (await probe_once(base, slow_after="2s", timeout="3s")).success


async def test_provider_error_fails_status_with_the_provider_message(sandbox: Sandbox) -> None:
    _, base = sandbox
    await set_faults(base, llm="error")
    result = await probe_once(base)
    assert result.reason == "status"
    assert "HTTP 503 on POST /chat/completions, expected 200" in result.message
    assert "over capacity" in result.message and "internal_server_error" in result.message


async def test_hanging_completion_times_out_in_the_completion_phase(sandbox: Sandbox) -> None:
    _, base = sandbox
    await set_faults(base, llm="hang")
    started = time.monotonic()
    result = await probe_once(base, run_timeout=0.5, slow_after="100ms")
    assert time.monotonic() - started < 2
    assert result.reason == "timeout" and "during completion" in result.message


async def test_nothing_listening_fails_connect() -> None:
    result = await probe_once(f"http://127.0.0.1:{free_port()}")
    assert result.reason == "connect"


async def test_malformed_answers_fail_assertion(serve_llm) -> None:  # type: ignore[no-untyped-def]
    base = await serve_llm(models={"models": []})
    result = await probe_once(base, base_url=base)
    assert result.reason == "assertion" and "not with an OpenAI model list" in result.message
    base = await serve_llm(completion={"id": "x", "choices": []})
    result = await probe_once(base, base_url=base)
    assert result.reason == "assertion" and "not with a chat completion" in result.message


# --- retry-after --------------------------------------------------------------------------------------------------


async def test_retry_after_is_honoured_no_request_is_sent_inside_the_window(sandbox: Sandbox) -> None:
    _, base = sandbox
    await set_faults(base, llm="rate_limited", llm_retry_after_seconds=30)
    probe = make_probe(base)
    try:
        first = await run_once(probe, 3.0, Scrubber())
        assert first.reason == "rate_limited"
        assert len(await received(base)) == 1

        await set_faults(base, llm="ok")  # even if the provider recovered, the canary keeps its word
        for _ in range(3):
            again = await run_once(probe, 3.0, Scrubber())
            assert again.reason == "rate_limited"
            assert "no request sent" in again.message and "will try again at" in again.message
            assert again.duration_seconds < 1.0  # failed fast: no request (counted below), no 3 s wait
            assert 25 < gauges(again)[("llm_backoff_seconds", "")] <= 30
            assert gauges(again)[("llm_ratelimit_remaining", "requests")] == 0  # the 429's figures are kept
        assert len(await received(base)) == 1
    finally:
        await probe.close()


async def test_after_the_retry_after_window_the_probe_calls_again(sandbox: Sandbox) -> None:
    _, base = sandbox
    await set_faults(base, llm="rate_limited", llm_retry_after_seconds=1)
    probe = make_probe(base)
    try:
        assert (await run_once(probe, 3.0, Scrubber())).reason == "rate_limited"
        await set_faults(base, llm="ok")
        inside = await run_once(probe, 3.0, Scrubber())
        assert inside.reason == "rate_limited" and "no request sent" in inside.message
        assert len(await received(base)) == 1

        await asyncio.sleep(1.1)
        after = await run_once(probe, 3.0, Scrubber())
        assert after.success, after.message
        assert gauges(after)[("llm_backoff_seconds", "")] == 0
        assert len(await received(base)) == 3
    finally:
        await probe.close()


async def test_the_back_off_moves_to_a_probe_of_the_same_provider_as_wall_clock_time(sandbox: Sandbox) -> None:
    """What a reload or a restart does with it: export, then restore into a newly built probe."""
    _, base = sandbox
    await set_faults(base, llm="rate_limited", llm_retry_after_seconds=120)
    first, second = make_probe(base), make_probe(base, interval="2m")
    try:
        assert (await run_once(first, 3.0, Scrubber())).reason == "rate_limited"
        await set_faults(base, llm="ok")
        state = first.export_state()
        assert first.state_key() == second.state_key() == f"{base}/llm/openai/v1 {DEFAULT_MODEL}"
        assert time.time() + 100 < state["retry_at"] <= time.time() + 120  # Unix time, not the loop's clock
        assert DEFAULT_API_KEY not in str(state)
        second.restore_state(state)
        again = await run_once(second, 3.0, Scrubber())
        assert again.reason == "rate_limited" and "no request sent" in again.message
        assert 100 < gauges(again)[("llm_backoff_seconds", "")] <= 120
        assert gauges(again)[("llm_ratelimit_remaining", "requests")] == 0  # the 429's figures came along
        assert len(await received(base)) == 1
    finally:
        await first.close()
        await second.close()
    assert make_probe(base, model="llama-3.1-8b-instant").state_key() != first.state_key()
    assert make_probe(base).export_state() == {}  # nothing to keep without a back-off


async def test_a_back_off_that_has_passed_restores_as_nothing(sandbox: Sandbox) -> None:
    _, base = sandbox
    probe = make_probe(base)
    try:
        probe.restore_state({"retry_at": time.time() - 5, "quotas": []})
        assert (await run_once(probe, 3.0, Scrubber())).success
        assert len(await received(base)) == 2
    finally:
        await probe.close()


@pytest.mark.parametrize("state", [
    pytest.param({"retry_at": time.time() + 30 * 86400}, id="a-month"),
    pytest.param({"retry_at": float("nan")}, id="nan"),
    pytest.param({"retry_at": float("inf")}, id="infinity"),
    pytest.param({"retry_at": True}, id="a-bool"),
    pytest.param({"retry_at": "1700000000"}, id="a-string"),
    pytest.param({"retry_at": 1.0, "token": "x"}, id="an-unknown-key"),
    pytest.param({"retry_at": time.time() + 60, "quotas": [{"kind": "dollars", "limit": 1.0}]}, id="an-unknown-kind"),
    pytest.param({"retry_at": time.time() + 60, "quotas": [{"kind": "tokens"}, {"kind": "tokens"}]}, id="a-kind-twice"),
    pytest.param({"quotas": []}, id="no-retry-at"),
])
def test_a_corrupt_or_hostile_back_off_is_refused_and_changes_nothing(state: dict[str, Any]) -> None:
    probe = make_probe("http://127.0.0.1:9")
    with pytest.raises(ValueError):
        probe.restore_state(state)
    assert probe.export_state() == {}


async def test_retry_after_as_an_http_date_is_honoured(serve_llm) -> None:  # type: ignore[no-untyped-def]
    later = datetime.now(timezone.utc) + timedelta(seconds=120)
    base = await serve_llm(status=429, headers={"retry-after": format_datetime(later, usegmt=True)})
    probe = make_probe(base, base_url=base)
    try:
        assert (await run_once(probe, 3.0, Scrubber())).reason == "rate_limited"
        again = await run_once(probe, 3.0, Scrubber())
        assert "no request sent" in again.message
        assert 100 < gauges(again)[("llm_backoff_seconds", "")] <= 120
        assert later.strftime("%H:%M") in again.message
    finally:
        await probe.close()


async def test_a_429_without_retry_after_does_not_stop_the_next_run(serve_llm) -> None:  # type: ignore[no-untyped-def]
    base = await serve_llm(status=429)
    probe = make_probe(base, base_url=base)
    try:
        first = await run_once(probe, 3.0, Scrubber())
        assert first.reason == "rate_limited" and "no retry-after" in first.message
        second = await run_once(probe, 3.0, Scrubber())
        assert "no request sent" not in second.message
    finally:
        await probe.close()


# --- parsers ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "seconds"), [
    ("2m59.56s", 179.56),          # Groq, requests (per day window)
    ("7.66s", 7.66),               # Groq, tokens
    ("1m0.363142857s", 60.363142857),
    ("50.597142857s", 50.597142857),
    ("1h2m3s", 3723.0),
    ("250ms", 0.25),
    ("6m0s", 360.0),               # OpenAI
    ("20ms", 0.02),
    ("0s", 0.0),
    ("834.5µs", 0.0008345),        # Go prints sub-millisecond durations in µs
    ("12", 12.0),                  # plain seconds
    ("1.5", 1.5),
    (" 7.66s ", 7.66),
])
def test_reset_header_durations(header: str, seconds: float) -> None:
    assert parse_reset(header) == pytest.approx(seconds)


@pytest.mark.parametrize("header", ["", "s", "abc", "5 s", "1.5.2s", "-1s", "-3", "7.66sec", "1m2", "nan", "inf", None])
def test_reset_header_garbage_is_ignored(header: str | None) -> None:
    assert parse_reset(header) is None


def test_retry_after_seconds_dates_and_bounds() -> None:
    now = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after("30", now) == 30
    assert parse_retry_after("1.5", now) == 1.5
    assert parse_retry_after("Sat, 01 Mar 2025 12:02:00 GMT", now) == 120
    assert parse_retry_after("Sat, 01 Mar 2025 11:00:00 GMT", now) == 0  # already past
    assert parse_retry_after("999999", now) == 3600  # capped: a bogus header cannot silence the probe for days
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("", now) is None
    assert parse_retry_after(None, now) is None


# --- secrets ------------------------------------------------------------------------------------------------------

SECRET_KEY = "gsk_SECRETcanaryKey0123456789abcdefXYZ"


@pytest.fixture
async def keyed_sandbox(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """The sandbox accepting a distinctive key, so every leak is greppable."""
    monkeypatch.setenv("LLM_API_KEY", SECRET_KEY)
    runner, base = await start_app(build_sandbox_app())
    try:
        yield base
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("fault", ["ok", "unauthorized", "rate_limited", "low_headroom", "model_missing",
                                   "model_unavailable", "slow", "error", "wrong_key"])
async def test_the_api_key_never_appears_in_results_or_logs(
    keyed_sandbox: str, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    base = keyed_sandbox
    key = SECRET_KEY + "-wrong" if fault == "wrong_key" else SECRET_KEY
    await set_faults(base, llm="ok" if fault == "wrong_key" else fault, llm_slow_seconds=0.3)
    probe = make_probe(base, api_key=key, slow_after="100ms")
    try:
        results = [await run_once(probe, 3.0, Scrubber()) for _ in range(2)]  # the second may be the fail-fast one
    finally:
        await probe.close()
    expected = {"ok": "ok", "unauthorized": "auth", "rate_limited": "rate_limited", "low_headroom": "rate_limited",
                "model_missing": "model_missing", "model_unavailable": "model_missing", "slow": "slow",
                "error": "status", "wrong_key": "auth"}[fault]
    assert results[0].reason == expected
    for result in results:
        texts = [result.message, *(c.text for c in result.checks), *(g.help for g in result.gauges), repr(result)]
        assert not any(SECRET_KEY in text or SECRET_KEY[:16] in text for text in texts)
    assert SECRET_KEY not in caplog.text and SECRET_KEY[:16] not in caplog.text
    assert SECRET_KEY not in repr(probe.settings) and SECRET_KEY not in probe.settings.target()


@pytest.mark.parametrize("status", [401, 500])
async def test_a_provider_that_echoes_the_key_does_not_leak_it(serve_llm, status: int) -> None:  # type: ignore[no-untyped-def]
    # Padded so that cutting the provider's message to its bound would split the key: it must be masked first.
    message = "x" * 180 + f" Incorrect API key provided: {SECRET_KEY}."
    base = await serve_llm(status=status, error={"message": message, "type": "invalid_request_error", "code": "bad"})
    result = await probe_once(base, base_url=base, api_key=SECRET_KEY)
    assert result.reason == ("auth" if status == 401 else "status")
    assert SECRET_KEY[:8] not in result.message


# --- config -------------------------------------------------------------------------------------------------------

SHIPPED_SNIPPET = """
[[probes]]
name = "llm-groq"
type = "llm"
channel = "ai_agent"
description = "The LLM provider lists the agent's model and answers a 1-token prompt within 10 s"
base_url = "${LLM_BASE_URL:-http://127.0.0.1:8000/llm/openai/v1}"
api_key = "${LLM_API_KEY:-sandbox-llm-api-key}"
model = "${LLM_MODEL:-meta-llama/llama-4-scout-17b-16e-instruct}"
interval = "1m"
timeout = "30s"
slow_after = "10s"
min_headroom = 0.1
"""


def test_shipped_snippet_loads_with_sandbox_defaults(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, SHIPPED_SNIPPET), PROBE_TYPES, environ={})
    (probe,) = config.probes
    assert isinstance(probe, LlmSettings)
    assert probe.channel == "ai_agent"
    assert probe.base_url == "http://127.0.0.1:8000/llm/openai/v1"
    assert probe.api_key.get_secret_value() == DEFAULT_API_KEY
    assert (probe.model, probe.timeout, probe.slow_after, probe.min_headroom) == (DEFAULT_MODEL, 30.0, 10.0, 0.1)
    assert DEFAULT_API_KEY in config.secrets
    environ = {"LLM_BASE_URL": "https://api.groq.com/openai/v1/", "LLM_API_KEY": "gsk_live", "LLM_MODEL": "llama-3.3-70b-versatile"}
    (live,) = load_config(write_config(tmp_path, SHIPPED_SNIPPET), PROBE_TYPES, environ=environ).probes
    assert (live.base_url, live.model) == ("https://api.groq.com/openai/v1", "llama-3.3-70b-versatile")


def test_api_key_file_and_groq_defaults(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(SECRET_KEY + "\n")
    body = f'[[probes]]\nname = "llm"\ntype = "llm"\nchannel = "ai"\ntimeout = "20s"\napi_key_file = "{tmp_path / "key"}"\n'
    config = load_config(write_config(tmp_path, body), PROBE_TYPES, environ={})
    (probe,) = config.probes
    assert probe.api_key.get_secret_value() == SECRET_KEY and SECRET_KEY in config.secrets
    assert probe.base_url == "https://api.groq.com/openai/v1" and probe.model == DEFAULT_MODEL
    assert (probe.timeout, probe.slow_after, probe.min_headroom) == (20.0, 10.0, 0.1)


def test_without_a_timeout_of_its_own_the_probe_takes_daemons(tmp_path: Path) -> None:
    # No timeout of the type's own: with a 20s interval there is no "timeout 30s is longer than the interval" about
    # a key nobody wrote.
    body = ('[daemon]\ntimeout = "15s"\n\n[[probes]]\nname = "llm"\ntype = "llm"\nchannel = "ai"\n'
            'interval = "20s"\napi_key = "k-123456"\n')
    (probe,) = load_config(write_config(tmp_path, body), PROBE_TYPES, environ={}).probes
    assert (probe.interval, probe.timeout, probe.slow_after) == (20.0, 15.0, 10.0)


@pytest.mark.parametrize(("daemon", "probe", "problem"), [
    ('timeout = "5s"\n', 'slow_after = "10s"\n',
     "probes[0].slow_after: 10s must be shorter than the probe's timeout 5s (inherited from "
     "[daemon].timeout); set a longer timeout on the probe, or a shorter slow_after"),
    ("", "",  # every default: [daemon]'s 10s is not longer than slow_after's 10s
     "probes[0].slow_after: 10s must be shorter than the probe's timeout 10s (inherited from "
     "[daemon].timeout); set a longer timeout on the probe, or a shorter slow_after"),
    ('timeout = "30s"\n', 'interval = "8s"\n',
     "probes[0].slow_after: 10s must be shorter than the probe's timeout 8s (inherited from the "
     "probe's interval, shorter than [daemon].timeout); set a longer timeout on the probe, or a shorter slow_after"),
    ("", 'timeout = "10s"\n',
     "probes[0].timeout: 10s must be longer than slow_after 10s, or a slow answer is cut off as a "
     "timeout instead of reported as slow"),
])
def test_an_effective_timeout_not_longer_than_slow_after_is_refused_naming_what_was_written(
    tmp_path: Path, daemon: str, probe: str, problem: str
) -> None:
    body = f'[daemon]\n{daemon}\n[[probes]]\nname = "llm"\ntype = "llm"\nchannel = "ai"\napi_key = "k-123456"\n{probe}'
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, body), PROBE_TYPES, environ={})
    assert caught.value.problems == [problem]


@pytest.mark.parametrize(("extra", "problem"), [
    ('timeout = "10s"\n', "probes[0].timeout: 10s must be longer than slow_after 10s"),
    ('timeout = "30s"\nslow_after = "45s"\n', "probes[0].timeout: 30s must be longer than slow_after 45s"),
    ('slow_after = "45s"\n', "probes[0].slow_after: 45s must be shorter than the probe's timeout 10s (inherited from [daemon].timeout)"),
    ('base_url = "api.groq.com/openai/v1"\n', "probes[0].base_url: must be an absolute http:// or https:// URL"),
    ('min_headroom = 1.5\n', "probes[0].min_headroom"),
    ('api_key = "has space"\n', "must be non-empty, without spaces or control characters"),
])
def test_bad_settings_are_refused_at_load(tmp_path: Path, extra: str, problem: str) -> None:
    body = '[[probes]]\nname = "llm"\ntype = "llm"\nchannel = "ai"\ninterval = "1m"\n'
    if "api_key" not in extra:
        body += 'api_key = "k-123456"\n'
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, body + extra), PROBE_TYPES, environ={})
    assert problem in str(caught.value)
    assert "has space" not in str(caught.value) and "k-123456" not in str(caught.value)


# --- a tiny configurable provider, for shapes the sandbox does not produce --------------------------------------------


@pytest.fixture
async def serve_llm() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def _serve(models: Any = None, completion: Any = None, status: int = 200,
                     headers: dict[str, str] | None = None, error: dict[str, Any] | None = None) -> str:
        listed = models if models is not None else {"object": "list", "data": [{"id": DEFAULT_MODEL, "object": "model"}]}

        def answer(document: Any) -> web.Response:
            if status != 200:
                body = {"error": error or {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}
                return web.json_response(body, status=status, headers=headers or {})
            return web.json_response(document, headers=headers or {})

        async def _models(request: web.Request) -> web.Response:
            return answer(listed)

        async def _completions(request: web.Request) -> web.Response:
            return answer(completion if completion is not None else {"choices": [{"message": {"content": "OK"}}]})

        app = web.Application()
        app.router.add_get("/models", _models)
        app.router.add_post("/chat/completions", _completions)
        runner, base = await start_app(app)
        runners.append(runner)
        return base

    try:
        yield _serve
    finally:
        for runner in runners:
            await runner.cleanup()
