"""The status page's figures and `/status.json`, without a browser: readable ages and durations, uptime percentages,
the overall verdict, and what the JSON carries. How the page looks and behaves is tested in a real Chromium
(tests/test_status_page_browser.py); what it must never show (paths, account SIDs) is tested here on the shipped
config."""

from __future__ import annotations

import json
from typing import Literal

import pytest

from canary.cli import main
from canary.config import load_config
from canary.contract import ProbeSettings, Result
from canary.state import ResultStore
from canary.uptime import UptimeBook
from exporter.status_page import readable_age, readable_duration, readable_ratio, render_status_page, status_json
from probes import PROBE_TYPES
from tests.conftest import ROOT

NOW = 1_800_000_000.0


class PlainSettings(ProbeSettings):
    type: Literal["plain"] = "plain"


def plain(name: str, channel: str, severity: str = "critical", **extra: str) -> PlainSettings:
    return PlainSettings(name=name, channel=channel, interval="30s", timeout="5s", severity=severity, **extra)


@pytest.mark.parametrize(("seconds", "shown"), [
    (0.2, "just now"), (13.3425, "13 s ago"), (59.9, "59 s ago"), (60, "1 min ago"), (150, "2 min ago"),
    (3599, "59 min ago"), (3 * 3600 + 5, "3 h ago"), (47 * 3600, "47 h ago"), (5 * 86400, "5 d ago"), (-3, "just now"),
])
def test_ages_read_in_whole_units(seconds: float, shown: str) -> None:
    assert readable_age(seconds) == shown


@pytest.mark.parametrize(("seconds", "shown"), [
    (0.0002, "<1 ms"), (0.0123, "12 ms"), (0.9994, "999 ms"), (1.34, "1.3 s"), (13.3425, "13 s"), (150, "2.5 min"),
])
def test_durations_read_with_three_digits_at_most(seconds: float, shown: str) -> None:
    assert readable_duration(seconds) == shown


@pytest.mark.parametrize(("ratio", "shown"), [
    (None, "–"), (1.0, "100%"), (0.99999, "99.99%"), (0.995, "99.5%"), (0.9, "90%"), (0.0, "0%"), (0.123456, "12.34%"),
])
def test_uptime_is_rounded_down_so_a_failure_never_reads_100_percent(ratio: float | None, shown: str) -> None:
    assert readable_ratio(ratio) == shown


def store_with(probes: list[PlainSettings]) -> ResultStore:
    store = ResultStore((1.0,), 10)
    store.sync(probes, (1.0,), 10)
    return store


@pytest.mark.parametrize(("results", "status", "headline"), [
    ({}, "pending", "Waiting for the first results"),
    ({"form": True, "hook": True, "queue": True}, "ok", "All operational"),
    ({"form": True, "hook": True, "queue": False}, "warning", "1 warning · all critical probes passing"),
    ({"form": False, "hook": False, "queue": False}, "critical", "2 critical failing · 1 warning"),
])
def test_the_verdict_counts_critical_failures_apart_from_warnings(results: dict[str, bool], status: str, headline: str) -> None:
    store = store_with([plain("form", "web_form"), plain("hook", "whatsapp"), plain("queue", "kafka", "warning")])
    for name, passed in results.items():
        store.record(name, Result.ok() if passed else Result.fail("connect", "refused"), NOW)
    overall = status_json(store.records(), store.channels(), now=NOW)["overall"]
    assert (overall["status"], overall["summary"]) == (status, headline)
    assert f'data-status="{status}"' in render_status_page(store.records(), store.channels(), now=NOW)


def test_status_json_carries_severity_description_runbook_and_uptime() -> None:
    hook = plain("hook", "whatsapp", description="Signed webhook answered", runbook_url="https://runbooks.example/wa#hook")
    store = store_with([hook, plain("queue", "kafka", "warning"), plain("idle", "api")])
    book = UptimeBook()
    store.add_listener(book.observe)
    for minute in range(60):
        store.record("hook", Result.ok(duration_seconds=0.1) if minute % 4 else Result.fail("auth", "403", duration_seconds=0.1), NOW - 3600 + minute * 60)
    store.record("queue", Result.fail("connect", "refused", duration_seconds=0.2), NOW - 5)

    document = status_json(store.records(), store.channels(), book, now=NOW)
    probes = {probe["name"]: probe for probe in document["probes"]}
    assert probes["hook"]["severity"] == "critical" and probes["queue"]["severity"] == "warning"
    assert probes["hook"]["description"] == "Signed webhook answered"
    assert probes["hook"]["runbook_url"] == "https://runbooks.example/wa#hook" and probes["queue"]["runbook_url"] is None
    assert probes["hook"]["uptime"]["1h"] == {"ratio": 0.75, "runs": 60, "failures": 15, "mean_latency_seconds": pytest.approx(0.1)}
    assert probes["queue"]["uptime"]["7d"]["ratio"] == 0.0
    assert probes["idle"]["uptime"]["24h"] == {"ratio": None, "runs": 0, "failures": 0, "mean_latency_seconds": None}
    assert probes["queue"]["state"] == "down"  # the state keeps its meaning; severity says it is only a warning
    assert document["channels"] == {"whatsapp": True, "kafka": False}
    assert document["channel_details"]["kafka"]["importance"] == "warning"
    assert document["channel_details"]["whatsapp"]["uptime"]["1h"]["failures"] == 15
    json.dumps(document)  # serialisable as it is


def test_everything_shown_is_escaped() -> None:
    hostile = plain("form", "web_form", description='<img src=x onerror="alert(1)">',
                    runbook_url='https://runbooks.example/"><script>alert(2)</script>')
    store = store_with([hostile])
    store.record("form", Result.fail("assertion", "<script>alert(3)</script>"), NOW)
    page = render_status_page(store.records(), store.channels(), now=NOW)
    for raw in ('<img src=x', "<script>alert(2)", "<script>alert(3)", '"><script>'):
        assert raw not in page
    assert "&lt;script&gt;alert(3)&lt;/script&gt;" in page


def test_the_shipped_config_shows_no_credentials_path_and_no_account_sid(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the gmail probe reads its credentials file relative to the working directory
    account_sid = "AC" + "1f" * 16
    environ = {"TWILIO_ACCOUNT_SID": account_sid, "GMAIL_CREDENTIALS_PATH": str(ROOT / "deploy/sandbox/gmail-authorized-user.json")}
    config = load_config(ROOT / "config.toml", PROBE_TYPES, environ=environ)
    store = ResultStore((1.0,), 5)
    store.sync(config.probes, (1.0,), 5)
    for probe in config.probes:
        store.record(probe.name, Result.fail("auth", "refused"), NOW)
    shown = [render_status_page(store.records(), store.channels(), now=NOW),
             json.dumps(status_json(store.records(), store.channels(), now=NOW))]
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", account_sid)
    monkeypatch.setenv("GMAIL_CREDENTIALS_PATH", environ["GMAIL_CREDENTIALS_PATH"])
    assert main(["list", "--config", str(ROOT / "config.toml")]) == 0
    shown.append(capsys.readouterr().out)
    for text in shown:
        assert "twilio-account" in text and "gmail" in text
        assert account_sid not in text and account_sid.lower() not in text.lower()
        assert "gmail-authorized-user.json" not in text and str(ROOT) not in text
