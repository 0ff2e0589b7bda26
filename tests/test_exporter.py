"""The exporter: exposition text read back with prometheus-client's parser and checked by promtool, and the
HTTP endpoints served on a real port."""

from __future__ import annotations

from dataclasses import replace

import shutil
import subprocess
from typing import Literal

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from canary.contract import Gauge, ProbeSettings, Result
from canary.state import ResultStore
from exporter.exposition import ProbeExposition
from exporter.self_metrics import DaemonMetrics
from exporter.server import ExporterSources, build_exporter_app
from tests.conftest import start_app

BUCKETS = (0.1, 0.5, 1.0)


class PlainSettings(ProbeSettings):
    type: Literal["plain"] = "plain"


def plain(name: str, channel: str = "web_form", **labels: str) -> PlainSettings:
    return PlainSettings(name=name, channel=channel, interval="30s", timeout="5s", labels=labels)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample in the text, keyed by name and label set; raises if the text does not parse."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(parsed: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return parsed[(name, frozenset(labels.items()))]


def build(probes: list[PlainSettings], static: dict[str, str] | None = None) -> tuple[ResultStore, ProbeExposition]:
    store = ResultStore(BUCKETS, history=10)
    store.sync(probes, BUCKETS, 10)
    exposition = ProbeExposition(static or {}, BUCKETS)
    store.add_listener(exposition.render)
    return store, exposition


def text_of(store: ResultStore, exposition: ProbeExposition) -> str:
    return exposition.exposition(store.records(), store.channels()).decode()


def test_series_for_passing_and_failing_probes() -> None:
    store, exposition = build([plain("form"), plain("db", channel="database")], static={"environment": "prod"})
    store.record("form", Result.ok("fine", duration_seconds=0.3, phases={"connect": 0.01, "first_byte": 0.2}), 1000.0)
    store.record("form", Result.fail("status", "HTTP 500", duration_seconds=2.0), 1010.0)
    store.record("db", Result.ok("SELECT 1 ok", duration_seconds=0.05,
                                 gauges=(Gauge("query_value", 42, "Value.", (("query", "backlog"),)),)), 1005.0)
    parsed = samples(text_of(store, exposition))
    form = dict(probe="form", channel="web_form", type="plain", environment="prod")
    db = dict(probe="db", channel="database", type="plain", environment="prod")

    assert value(parsed, "canary_probe_success", **form) == 0
    assert value(parsed, "canary_probe_success", **db) == 1
    assert value(parsed, "canary_probe_duration_seconds", **form) == 2.0
    assert value(parsed, "canary_probe_last_run_timestamp_seconds", **form) == 1010.0
    assert value(parsed, "canary_probe_last_success_timestamp_seconds", **form) == 1000.0
    assert value(parsed, "canary_probe_runs_total", result="success", **form) == 1
    assert value(parsed, "canary_probe_runs_total", result="failure", **form) == 1
    assert value(parsed, "canary_probe_failures_total", reason="status", **form) == 1
    assert value(parsed, "canary_probe_interval_seconds", **form) == 30
    assert value(parsed, "canary_probe_query_value", query="backlog", **db) == 42
    # The last run had no phases, so the earlier run's phases are not shown as if they were current.
    assert ("canary_probe_phase_duration_seconds", frozenset({**form, "phase": "connect"}.items())) not in parsed
    # Histogram: 0.3 s falls in le=0.5, 2.0 s only in +Inf; buckets are cumulative.
    assert value(parsed, "canary_probe_latency_seconds_bucket", le="0.1", **form) == 0
    assert value(parsed, "canary_probe_latency_seconds_bucket", le="0.5", **form) == 1
    assert value(parsed, "canary_probe_latency_seconds_bucket", le="1.0", **form) == 1
    assert value(parsed, "canary_probe_latency_seconds_bucket", le="+Inf", **form) == 2
    assert value(parsed, "canary_probe_latency_seconds_count", **form) == 2
    assert value(parsed, "canary_probe_latency_seconds_sum", **form) == pytest.approx(2.3)
    assert value(parsed, "canary_channel_up", channel="web_form", environment="prod", importance="critical") == 0
    assert value(parsed, "canary_channel_up", channel="database", environment="prod", importance="critical") == 1


def test_a_counter_figure_is_exported_typed_as_a_counter_with_total() -> None:
    # A server-lifetime count (Redis's rejected connections): typed counter, so rate() handles its resets.
    store, exposition = build([plain("redis", channel="database")])
    store.record("redis", Result.ok(gauges=(
        Gauge("redis_rejected_connections", 7, "Connections Redis refused since it started.", kind="counter"),
        Gauge("redis_connected_clients", 3, "Clients connected to Redis."),
    )), 1.0)
    text = text_of(store, exposition)

    assert "# TYPE canary_probe_redis_rejected_connections_total counter\n" in text
    assert "# TYPE canary_probe_redis_connected_clients gauge\n" in text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    rejected = families["canary_probe_redis_rejected_connections"]  # the parser drops a counter's _total
    assert rejected.type == "counter"
    [sample] = rejected.samples
    assert (sample.name, sample.value) == ("canary_probe_redis_rejected_connections_total", 7)
    assert families["canary_probe_redis_connected_clients"].type == "gauge"


@pytest.mark.parametrize(("figure", "error"), [
    (dict(name="rejected_total", kind="counter"), "must not end in _total"),
    (dict(name="rejected", kind="histogram"), "neither 'gauge' nor 'counter'"),
    (dict(name="rejected", labels=(("__name__", "x"),)), "not a valid label name"),
    (dict(name="rejected", kind="counter", labels=(("bad-label", "x"),)), "not a valid label name"),
])
def test_a_figure_that_would_break_the_scrape_is_refused(figure: dict, error: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=error):
        Gauge(value=1, help="x", **figure)


def test_phases_of_the_last_run_are_exported() -> None:
    store, exposition = build([plain("form")])
    store.record("form", Result.ok(phases={"connect": 0.01, "tls": 0.02}), 1.0)
    parsed = samples(text_of(store, exposition))
    labels = dict(probe="form", channel="web_form", type="plain")
    assert value(parsed, "canary_probe_phase_duration_seconds", phase="connect", **labels) == 0.01
    assert value(parsed, "canary_probe_phase_duration_seconds", phase="tls", **labels) == 0.02


def test_reported_channels_feed_channel_up_and_the_platforms_own_series() -> None:
    store, exposition = build([plain("health", channel="api")])
    store.record("health", Result.ok(channels={"email": True, "whatsapp": False}), 1.0)
    parsed = samples(text_of(store, exposition))
    assert value(parsed, "canary_channel_up", channel="api", importance="critical") == 1
    assert value(parsed, "canary_channel_up", channel="email", importance="critical") == 1
    assert value(parsed, "canary_channel_up", channel="whatsapp", importance="critical") == 0
    # What the platform itself says, apart: every probe passed, and yet WhatsApp is down by the platform's word.
    assert value(parsed, "canary_platform_channel_up", channel="whatsapp") == 0
    assert value(parsed, "canary_platform_channel_up", channel="email") == 1
    assert ("canary_platform_channel_up", frozenset({("channel", "api")})) not in parsed  # nobody reports on api


def test_a_channel_only_warning_probes_speak_for_is_a_warning_channel() -> None:
    queue = PlainSettings(name="queue", channel="kafka", interval="30s", timeout="5s", severity="warning")
    store, exposition = build([plain("form"), queue])
    store.record("form", Result.ok(), 1.0)
    store.record("queue", Result.fail("connect", "refused"), 1.0)
    parsed = samples(text_of(store, exposition))
    assert value(parsed, "canary_channel_up", channel="kafka", importance="warning") == 0
    assert value(parsed, "canary_channel_up", channel="web_form", importance="critical") == 1


def test_a_probe_that_never_ran_has_no_success_series_and_no_channel_state() -> None:
    store, exposition = build([plain("waiting")])
    text = text_of(store, exposition)
    assert "canary_probe_success" not in text
    assert "canary_channel_up" not in text
    parsed = samples(text)
    assert value(parsed, "canary_probe_runs_total", result="success", probe="waiting", channel="web_form", type="plain") == 0


def test_a_removed_probe_disappears_on_the_next_scrape() -> None:
    store, exposition = build([plain("stays"), plain("goes")])
    store.record("stays", Result.ok(), 1.0)
    store.record("goes", Result.fail("timeout", "slow"), 1.0)
    assert 'probe="goes"' in text_of(store, exposition)
    store.sync([plain("stays")], BUCKETS, 10)
    text = text_of(store, exposition)
    assert 'probe="goes"' not in text
    assert 'probe="stays"' in text


def test_a_cached_render_is_refreshed_when_the_record_changes() -> None:
    store, exposition = build([plain("form")])
    store.record("form", Result.ok(), 1.0)
    first = text_of(store, exposition)
    store.record("form", Result.fail("status", "500"), 2.0)
    second = text_of(store, exposition)
    assert first != second
    assert value(samples(second), "canary_probe_success", probe="form", channel="web_form", type="plain") == 0


def test_label_values_are_escaped() -> None:
    store, exposition = build([plain("form", team='a "quoted"\\ team\nname')])
    store.record("form", Result.ok(), 1.0)
    parsed = samples(text_of(store, exposition))
    assert value(parsed, "canary_probe_success", probe="form", channel="web_form", type="plain",
                 team='a "quoted"\\ team\nname') == 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package 'prometheus')")
def test_promtool_finds_nothing_to_complain_about() -> None:
    store, exposition = build([plain("form"), plain("db", channel="database")], static={"environment": "prod"})
    store.record("form", Result.ok(phases={"connect": 0.01}, channels={"whatsapp": False},
                                   gauges=(Gauge("postgres_connections", 3, "Connections."),
                                           Gauge("redis_rejected_connections", 2, "Refused.", kind="counter"))), 1.0)
    store.record("db", Result.fail("auth", "refused"), 1.0)
    metrics = DaemonMetrics()
    metrics.config_loaded(True, 2)
    metrics.observe_lateness(0.002)
    text = metrics.exposition().decode() + text_of(store, exposition)
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked.stdout + checked.stderr


async def test_http_endpoints() -> None:
    store, exposition = build([plain("form")])
    store.record("form", Result.fail("assertion", "<script>alert(1)</script> body mismatch"), 1.0)
    ready = {"value": False}
    metrics = DaemonMetrics()
    runner, url = await start_app(build_exporter_app(ExporterSources(store, exposition, metrics, lambda: ready["value"])))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with session.get(f"{url}/metrics") as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                parsed = samples(await response.text())
                assert value(parsed, "canary_probe_success", probe="form", channel="web_form", type="plain") == 0
                assert ("canary_build_info", frozenset()) not in parsed  # build info carries its labels
                assert any(name == "canary_build_info" for name, _ in parsed)
            async with session.get(f"{url}/healthz") as response:
                assert response.status == 200
            async with session.get(f"{url}/readyz") as response:
                assert response.status == 503
            ready["value"] = True
            async with session.get(f"{url}/readyz") as response:
                assert response.status == 200
            async with session.get(f"{url}/") as response:
                page = await response.text()
                assert response.status == 200 and "text/html" in response.headers["Content-Type"]
                assert "<script>alert(1)</script>" not in page
                assert "&lt;script&gt;" in page and "DOWN" in page
            async with session.get(f"{url}/status.json") as response:
                status = await response.json()
                assert status["probes"][0]["name"] == "form"
                assert status["probes"][0]["state"] == "down"
                assert status["channels"] == {"web_form": False}
    finally:
        await runner.cleanup()


def test_only_warning_probes_carry_an_importance_label_and_none_carries_severity() -> None:
    critical = plain("form")
    warning = PlainSettings(name="queue", channel="kafka", interval="30s", timeout="5s", severity="warning")
    store, exposition = build([critical, warning])
    store.record("form", Result.ok(), 1.0)
    store.record("queue", Result.fail("connect", "refused"), 1.0)
    parsed = samples(text_of(store, exposition))
    assert value(parsed, "canary_probe_success", probe="form", channel="web_form", type="plain") == 1
    assert value(parsed, "canary_probe_success", probe="queue", channel="kafka", type="plain", importance="warning") == 0
    assert not any(("severity", "warning") in labels for _, labels in parsed)  # alert rules own `severity`


def test_history_keeps_the_latest_runs_oldest_first_in_a_compact_form() -> None:
    import gc

    store, _ = build([plain("form")])  # history=10
    for second in range(12):
        result = Result.fail("status", "HTTP 500") if second % 4 == 3 else Result.ok("HTTP 200 OK")
        store.record("form", replace(result, duration_seconds=second / 100), float(second))
    record = store.get("form")
    assert record is not None
    entries = record.history
    assert [entry.wall_time for entry in entries] == [float(second) for second in range(2, 12)]
    assert [entry.duration_seconds for entry in entries] == [second / 100 for second in range(2, 12)]
    assert [(entry.success, entry.reason, entry.message) for entry in entries if not entry.success] == [
        (False, "status", "HTTP 500")] * 3
    # Runs that end alike share one outcome, which the garbage collector stops tracking (plain values only).
    outcomes = record._history._outcomes
    assert len({id(outcome) for outcome in outcomes}) == 6  # 10 runs in 6 stretches of alike outcomes
    gc.collect()
    assert not any(gc.is_tracked(outcome) for outcome in outcomes)
