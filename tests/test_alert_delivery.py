"""The whole alerting path, end to end, with real processes: sandbox fault → daemon on the shipped config.toml →
Prometheus evaluating the shipped rules → Alertmanager with the shipped routes and inhibitions → a webhook receiver.

One sandbox and one daemon per environment (CANARY_ENVIRONMENT, which config.toml maps to the `environment` label),
all scraped by one Prometheus feeding one Alertmanager, so the faults run in parallel. The test's own copies of the
rules and the Alertmanager config shorten only durations: every `for:` is divided by 60 (2m → 2s, 5m → 5s, keeping
their order), evaluation and scrape run every second, and the Alertmanager's group_wait/group_interval are seconds;
the expressions, labels, routes and inhibitions are the shipped ones.

Faults are switched on before the daemons start, so each probe's first run (within config.toml's 10 s jitter) already
meets them: the Twilio and Gmail probes run every 5 minutes, longer than this test."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from deploy.mixin import config
from tests.conftest import ROOT, Process, free_port, port_open, probe_command, wait_for, wait_for_port
from tests.observability import (RULE_FILES, Webhooks, start_alertmanager, start_prometheus, start_webhooks,
                                 stop_webhooks)
from tests.test_shipped_config import platform_env

PAGE = "page"

# environment → (the sandbox's faults, the alerts (name, channel, severity) that must reach the receiver).
# Faults share a sandbox only where they touch different probes, so each alert is still one fault's doing.
FAULTS: dict[str, tuple[dict[str, Any], set[tuple[str, str, str]]]] = {
    "rejected": ({"whatsapp_webhook": "reject_all", "llm": "unauthorized", "gmail_oauth": "revoked"}, {
        ("CanaryWhatsAppWebhookFailing", "whatsapp", PAGE),
        ("CanaryLLMAuthFailing", "ai_agent", PAGE),
        ("CanaryGmailInvalidGrant", "email", PAGE),
    }),
    "insecure": ({"whatsapp_webhook": "skip_validation", "llm": "model_missing", "twilio_account": "suspended"}, {
        ("CanaryWhatsAppSignatureNotVerified", "whatsapp", PAGE),
        ("CanaryLLMModelMissing", "ai_agent", PAGE),
        ("CanaryTwilioAccountSuspended", "whatsapp", PAGE),
    }),
    "stalled": ({"agent": "stalled"}, {("CanaryWebFormAgentReplySlow", "web_form", "ticket")}),
    "platform-error": ({"health": "error"}, {("CanaryPlatformDown", "api", PAGE)}),
    "platform-hang": ({"health": "hang"}, {("CanaryPlatformDown", "api", PAGE)}),
    "healthy": ({}, set()),
}
PLATFORM_DOWN = ("platform-error", "platform-hang")
# What CanaryPlatformDown explains (the shipped inhibit_rules' first rule): these pages must not be delivered there.
EXPLAINED = {"CanaryChannelDown", "CanaryProbeFailing", "CanaryApiLatencyHigh", "CanaryWebFormAgentReplySlow",
             "CanaryWhatsAppWebhookFailing", "CanaryErrorBudgetBurn"}
ARRIVAL_TIMEOUT = 150.0  # the stalled agent's first run alone takes jitter + 15 s; generous for a loaded machine

DURATION = re.compile(r"^(\s+for: )(\d+)([smh])$", re.M)


def fast_rules(directory: Path) -> list[Path]:
    """Copies of the shipped rule files with every `for:` divided by 60 (at least 1 s); nothing else changes."""
    directory.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in RULE_FILES:
        def shorter(match: re.Match[str]) -> str:
            seconds = int(match[2]) * {"s": 1, "m": 60, "h": 3600}[match[3]]
            return f"{match[1]}{max(1, seconds // 60)}s"

        text, count = DURATION.subn(shorter, path.read_text())
        assert count or "for:" not in path.read_text(), f"{path.name}: a `for:` this test cannot shorten"
        copy = directory / path.name
        copy.write_text(text)
        copies.append(copy)
    return copies


def set_faults(sandbox: str, faults: dict[str, Any]) -> None:
    request = urllib.request.Request(f"{sandbox}/_sandbox/faults", data=json.dumps(faults).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()


def delivered(webhooks: Webhooks) -> dict[str, set[tuple[str, str, str]]]:
    """Per environment, the firing alerts (name, channel, severity) that reached a receiver."""
    found: dict[str, set[tuple[str, str, str]]] = {env: set() for env in FAULTS}
    for _, alert in webhooks.alerts():
        labels = alert["labels"]
        if alert["status"] == "firing" and labels.get("environment") in found:
            found[labels["environment"]].add((labels["alertname"], labels.get("channel", ""), labels["severity"]))
    return found


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, Webhooks]]:
    """Everything started, on free loopback ports; everything stopped by pid on the way out, newest first."""
    if not port_open("127.0.0.1", 6379):
        pytest.skip("no Redis reachable at 127.0.0.1:6379 (the shipped config probes it)")
    if not port_open("127.0.0.1", 5432):
        pytest.skip("no PostgreSQL reachable at 127.0.0.1:5432 (the shipped config probes it)")
    started: list[Process] = []
    webhooks = start_webhooks()
    try:
        # A group_wait of a few seconds, as the shipped 30 s does in production, lets CanaryPlatformDown reach
        # Alertmanager before the group of an alert it inhibits is first flushed.
        alertmanager, am_url = start_alertmanager(tmp_path / "alertmanager", webhooks, group_wait="5s",
                                                  group_interval="2s", repeat_interval="1h")
        started.append(alertmanager)
        sandboxes: dict[str, tuple[Process, str]] = {}
        for env in FAULTS:
            port = free_port()
            sandboxes[env] = Process(probe_command("sandbox", "--listen", f"127.0.0.1:{port}"), cwd=ROOT), \
                f"http://127.0.0.1:{port}"
            started.append(sandboxes[env][0])
        for env, (faults, _) in FAULTS.items():
            process, url = sandboxes[env]
            wait_for_port(int(url.rsplit(":", 1)[1]), process, timeout=30)
            if faults:
                set_faults(url, faults)
        ports = {env: free_port() for env in FAULTS}
        # Prometheus first, so it scrapes each daemon's zeroed failure counters before a probe's first run: the
        # rules read increase(), which cannot see a counter that was already 1 when first scraped.
        prometheus, _ = start_prometheus(tmp_path / "prometheus", list(ports.values()),
                                         rule_files=fast_rules(tmp_path / "rules"), alertmanager=am_url)
        started.append(prometheus)
        for env in FAULTS:
            daemon_env = {**platform_env(sandboxes[env][1]), "CANARY_ENVIRONMENT": env}
            for shortened in ("AGENT_REPLY_SLA", "LLM_SLOW_AFTER"):  # the shipped values: the rules' thresholds
                daemon_env.pop(shortened)
            started.append(Process(probe_command("run", "--config", "config.toml", "--listen",
                                                 f"127.0.0.1:{ports[env]}"), cwd=ROOT, env=daemon_env))
        for port, daemon in zip(ports.values(), started[-len(ports):]):
            wait_for_port(port, daemon, timeout=60)
        yield am_url, webhooks
    finally:
        for process in started:  # all asked at once, then each waited for: the stops overlap
            if process.popen.poll() is None:
                process.popen.terminate()
        for process in reversed(started):
            process.stop()
        stop_webhooks(webhooks)


def inhibited(alertmanager: str) -> set[tuple[str, str, str, str]]:
    """(environment, name, channel, severity) of the alerts Alertmanager holds back by an inhibition."""
    with urllib.request.urlopen(f"{alertmanager}/api/v2/alerts", timeout=10) as response:
        alerts = json.load(response)
    return {(a["labels"].get("environment", ""), a["labels"]["alertname"], a["labels"].get("channel", ""),
             a["labels"]["severity"]) for a in alerts if a["status"]["inhibitedBy"]}


def test_each_sandbox_fault_delivers_its_alert_naming_its_channel(stack: tuple[str, Webhooks]) -> None:
    alertmanager, webhooks = stack
    started = time.monotonic()

    def all_arrived() -> bool:
        got = delivered(webhooks)
        return all(expected <= got[env] for env, (_, expected) in FAULTS.items())

    try:
        wait_for(all_arrived, timeout=ARRIVAL_TIMEOUT, what="every fault's alert at the receiver")
    except AssertionError:
        got = delivered(webhooks)
        missing = {env: expected - got[env] for env, (_, expected) in FAULTS.items() if expected - got[env]}
        raise AssertionError(f"not delivered after {time.monotonic() - started:.0f}s: {missing}; delivered: {got}")
    time.sleep(6)  # a group_wait and more: an inhibited page or a healthy environment's page would be here by now

    got = delivered(webhooks)
    # A page goes to the pager, a ticket to the ticket queue.
    for path, alert in webhooks.alerts():
        assert path == ("/pager" if alert["labels"]["severity"] == PAGE else "/ticket"), alert["labels"]
    # The healthy sandbox pages nobody (its Kafka probes have no broker: warning-only, tickets at most).
    assert {a for a in got["healthy"] if a[2] == PAGE} == set()
    # The platform not answering: its page and no other, the channel pages it explains held back.
    for env in PLATFORM_DOWN:
        assert {a for a in got[env] if a[2] == PAGE} == {("CanaryPlatformDown", "api", PAGE)}, (env, got[env])
        assert not {a for a in got[env] if a[0] in EXPLAINED and a[1] in config.PLATFORM_CHANNELS}, (env, got[env])
    # ... and held back, not merely absent: the api channel's own pages fired in Prometheus and reached
    # Alertmanager, which inhibits them there.
    wait_for(lambda: all({(env, "CanaryProbeFailing", "api", PAGE), (env, "CanaryChannelDown", "api", PAGE)}
                         <= inhibited(alertmanager) for env in PLATFORM_DOWN),
             timeout=60, what="the platform's channel pages inhibited in Alertmanager")
