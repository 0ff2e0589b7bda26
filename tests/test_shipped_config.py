"""The shipped config.toml against the sandbox, as a CI smoke test would run it: all green, and one fault at a
time turns exactly its channel red with the runbook's reason; its Kafka probes against a fresh broker."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import urllib.request

import pytest

from tests.conftest import ROOT, free_port, port_open, probe_command
from tests.kafka_broker import Broker, create_topics


def platform_env(platform: str) -> dict[str, str]:
    """Point every canary of the shipped config at a sandbox on another port than the default."""
    return {
        "PLATFORM_URL": platform,
        "TWILIO_API_URL": f"{platform}/twilio",
        "GMAIL_API_URL": f"{platform}/google",
        "GMAIL_OAUTH_TOKEN_URL": f"{platform}/google/token",
        "LLM_BASE_URL": f"{platform}/llm/openai/v1",
        "STATUSPAGE_URL": f"{platform}/statuspage",
        "AGENT_REPLY_SLA": "2s",
        "LLM_SLOW_AFTER": "1s",
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",  # no broker: the warning-severity Kafka probes WARN
    }


def once(platform: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    completed = subprocess.run(
        probe_command("--once", "--config", "config.toml", "--format", "json"),
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, **platform_env(platform)},
    )
    assert completed.returncode in (0, 1), completed.stderr
    return completed.returncode, json.loads(completed.stdout)


def set_faults(platform: str, faults: dict) -> None:  # type: ignore[type-arg]
    request = urllib.request.Request(f"{platform}/_sandbox/faults", data=json.dumps(faults).encode(), method="POST")
    urllib.request.urlopen(request, timeout=5).close()


@pytest.fixture
def redis_up() -> None:
    if not port_open("127.0.0.1", 6379):
        pytest.skip("no Redis reachable at 127.0.0.1:6379 (the shipped config probes it)")


def test_every_shipped_canary_passes_against_the_sandbox(sandbox_process: str, postgres_dsn: str, redis_up: None) -> None:
    code, report = once(sandbox_process)
    failed = [(r["name"], r["reason"], r["message"]) for r in report["results"] if not r["success"]]
    assert code == 0
    # Only the Kafka probes fail (no broker here), and they are warnings that do not fail the run.
    assert {(name, reason) for name, reason, _ in failed} == {("kafka", "connect"), ("kafka-lag", "connect"), ("kafka-dlq", "connect")}
    assert report["failed"] == 0 and report["warnings"] == 3
    assert {r["channel"] for r in report["results"]} == {
        "api", "database", "web_form", "whatsapp", "email", "ai_agent", "ai_provider", "cache", "kafka", "kafka_dlq",
    }


@pytest.mark.parametrize(
    ("faults", "channel", "reasons"),
    [
        ({"health": "error"}, "api", {"status"}),
        ({"agent": "stalled"}, "web_form", {"slow"}),
        ({"whatsapp_webhook": "skip_validation"}, "whatsapp", {"insecure"}),
        ({"whatsapp_webhook": "reject_all"}, "whatsapp", {"auth"}),
        ({"twilio_account": "suspended"}, "whatsapp", {"assertion"}),
        ({"gmail_oauth": "revoked"}, "email", {"invalid_grant"}),
        ({"gmail_watch": "expiring"}, "email", {"expiry"}),
        ({"llm": "unauthorized"}, "ai_agent", {"auth"}),
        ({"llm": "rate_limited"}, "ai_agent", {"rate_limited"}),
        ({"llm": "model_missing"}, "ai_agent", {"model_missing"}),
        ({"llm": "slow", "llm_slow_seconds": 1.5}, "ai_agent", {"slow"}),
        ({"statuspage_indicator": "major"}, "ai_provider", {"assertion"}),
    ],
)
def test_one_fault_turns_exactly_its_channel_red(
    sandbox_process: str, postgres_dsn: str, redis_up: None, faults: dict, channel: str, reasons: set  # type: ignore[type-arg]
) -> None:
    set_faults(sandbox_process, faults)
    code, report = once(sandbox_process)
    failing = [r for r in report["results"] if not r["success"] and r["severity"] == "critical"]
    assert code == 1
    assert failing, "no probe failed"
    assert {r["channel"] for r in failing} == {channel}, failing
    assert {r["reason"] for r in failing} == reasons, failing
    # The canary left nothing behind in the platform's tickets, whatever failed.
    with urllib.request.urlopen(f"{sandbox_process}/_sandbox/tickets", timeout=5) as response:
        assert json.loads(response.read())["tickets"] == []


def test_the_shipped_kafka_probes_pass_against_a_fresh_broker(own_kafka_broker: Broker) -> None:
    """A fresh cluster holds the platform's topics, which the platform creates, but not the canary's: the kafka probe
    creates fte.canary and its round trip passes in that same run (it used to fail with "topics missing from the
    cluster: fte.canary"); kafka-lag, on the same channel, sees consumer groups with nothing to consume."""
    asyncio.run(create_topics(own_kafka_broker.bootstrap, "fte.tickets.incoming"))
    env = {**os.environ, **platform_env(f"http://127.0.0.1:{free_port()}"),
           "KAFKA_BOOTSTRAP_SERVERS": own_kafka_broker.bootstrap}
    completed = subprocess.run(probe_command("--once", "--config", "config.toml", "--only", "kafka", "--format", "json"),
                               capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    report = json.loads(completed.stdout)
    results = {r["name"]: r for r in report["results"]}
    assert set(results) == {"kafka", "kafka-lag"}
    assert results["kafka"]["success"], results["kafka"]["message"]
    assert results["kafka"]["message"].startswith("canary round trip through fte.canary partition 0 in ")
    assert results["kafka"]["message"].endswith("(created the canary topic: 1 partitions, replication 1)")
    assert results["kafka-lag"]["success"], results["kafka-lag"]["message"]
    assert completed.returncode == 0, completed.stderr
