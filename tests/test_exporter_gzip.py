"""Compressed scrapes: the gzip body (concatenated gzip members, mostly compressed before the scrape) decompresses to
the plain body byte for byte in both formats, whatever changed in between; the endpoint negotiates it by
Accept-Encoding; and a real Prometheus, which asks for gzip, ingests it."""

from __future__ import annotations

import gzip
import http.client
import re
import shutil
import subprocess
import threading
import urllib.request
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest

from canary.contract import RUNNER_REASONS, Gauge, ProbeSettings, Result
from canary.state import ResultStore
from exporter.exposition import CHUNK, ProbeExposition
from exporter.self_metrics import DaemonMetrics
from exporter.server import ExporterSources, build_exporter_app, wants_gzip, wants_openmetrics
from tests.conftest import ROOT, Process, free_port, probe_command, start_app, wait_for, wait_for_port, write_config
from tests.observability import prometheus_api, start_prometheus

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REASONS = (*RUNNER_REASONS, "dns", "connect", "tls", "status", "assertion", "body")


class PlainSettings(ProbeSettings):
    type: Literal["plain"] = "plain"


def settings(index: int, **changes: Any) -> PlainSettings:
    fields: dict[str, Any] = {"name": f"probe-{index:04d}", "channel": ("api", "email", "whatsapp")[index % 3],
                              "interval": "30s", "timeout": "5s", "labels": {"team": f"t{index % 4}"} if index % 5 == 0 else {}}
    if index % 7 == 0:
        fields["severity"] = "warning"
    return PlainSettings(**{**fields, **changes})


def result(index: int, round_: int) -> Result:
    """A mix like a real deployment: phases on every run, figures on some, a few failures, varying durations."""
    duration = ((index * 37 + round_ * 11) % 400) / 1000
    phases = {"dns": duration * 0.1, "connect": duration * 0.2, "first_byte": duration * 0.6}
    if (index + round_) % 11 == 0:
        return Result.fail("status", "HTTP 503", duration_seconds=duration, phases=phases)
    gauges = (Gauge("postgres_connections", index % 50 + round_, "Connections open."),
              Gauge("postgres_max_connections", 100, "The server's max_connections.")) if index % 4 == 0 else ()
    return Result.ok("fine", duration_seconds=duration, phases=phases, gauges=gauges,
                     channels={"email": (index + round_) % 13 != 0} if index % 9 == 0 else {})


def build(count: int) -> tuple[ResultStore, ProbeExposition, list[PlainSettings]]:
    probes = [settings(i) for i in range(count)]
    store = ResultStore(BUCKETS, 10, reasons_for=lambda _: REASONS)  # every failure counter from 0, as the daemon has
    store.sync(probes, BUCKETS, 10)
    exposition = ProbeExposition({"environment": "prod"}, BUCKETS)
    store.add_listener(exposition.render)
    return store, exposition, probes


def run_round(store: ResultStore, probes: list[PlainSettings], round_: int, every: int = 1) -> None:
    for index, probe in enumerate(probes):
        if index % every == 0 and index != 5:  # probe 5 never runs: a probe with no results yet
            store.record(probe.name, result(index, round_), 1_700_000_000.0 + round_ * 30 + index / 1000)


def assert_identical(store: ResultStore, exposition: ProbeExposition, metrics: DaemonMetrics) -> bytes:
    """Both formats: the gzip body decompresses to the plain body built from the same state, byte for byte."""
    plain = b""
    for openmetrics in (False, True):
        prefix = metrics.exposition(openmetrics)  # once for both bodies: the process figures move between calls
        zipped = exposition.gzip_exposition(store.records(), store.channels(), prefix=prefix, openmetrics=openmetrics)
        text = exposition.exposition(store.records(), store.channels(), prefix=prefix, openmetrics=openmetrics)
        assert gzip.decompress(zipped) == text
        assert text.endswith(b"# EOF\n") == openmetrics
        if not openmetrics:
            plain = text
    return plain


def members(stream: bytes) -> int:
    """How many gzip members `stream` holds."""
    count = 0
    while stream:
        reader = zlib.decompressobj(wbits=31)
        reader.decompress(stream)
        assert reader.eof
        stream, count = reader.unused_data, count + 1
    return count


def test_the_gzip_body_decompresses_to_the_plain_body_through_changes_and_reloads() -> None:
    store, exposition, probes = build(2 * CHUNK + 40)  # three chunks, the last one partial
    metrics = DaemonMetrics(labels={"environment": "prod"})
    # Before any gzip scrape the plain body is all text; the first gzip scrape compresses every fragment.
    run_round(store, probes, 1)
    first = exposition.exposition(store.records(), store.channels(), prefix=metrics.exposition())
    plain = assert_identical(store, exposition, metrics)
    assert plain.split(b"\n# HELP canary_channel_up")[1] == first.split(b"\n# HELP canary_channel_up")[1]
    zipped = exposition.gzip_exposition(store.records(), store.channels())
    assert members(zipped) > 3 * 9  # members, not one stream: chunks and fragments compressed apart
    assert exposition.gzip_exposition(store.records(), store.channels()) == zipped  # nothing changed, nothing moved

    # Results change: all of them, then a third (the other chunks keep their compressed form).
    run_round(store, probes, 2)
    assert_identical(store, exposition, metrics)
    run_round(store, probes, 3, every=3)
    plain = assert_identical(store, exposition, metrics)
    assert re.search(rb'canary_probe_interval_seconds\{[^}]*probe="probe-0005"', plain)
    assert not re.search(rb'canary_probe_success\{[^}]*probe="probe-0005"', plain)  # it never ran

    # A reload removes probes (one from each chunk, and the whole last chunk), changes one and adds one.
    kept = [p for i, p in enumerate(probes) if i % CHUNK != 3 and i < 2 * CHUNK]
    kept[10] = settings(11, interval="10s")
    kept.append(settings(9999))
    store.sync(kept, BUCKETS, 10)
    exposition.configure({"environment": "prod"}, BUCKETS)
    plain = assert_identical(store, exposition, metrics)
    assert b'probe="probe-0003"' not in plain and b'probe="probe-0300"' not in plain
    assert b'canary_probe_interval_seconds{channel="whatsapp",environment="prod",probe="probe-0011",type="plain"} 10.0' in plain
    assert b'probe="probe-9999"' in plain
    run_round(store, kept, 4)
    assert_identical(store, exposition, metrics)

    # A reload with new static labels: every fragment is rendered anew.
    exposition.configure({"environment": "staging"}, BUCKETS)
    plain = assert_identical(store, exposition, metrics)
    assert b'environment="prod",probe=' not in plain and b'environment="staging",probe="probe-9999"' in plain
    # And a reload to no probes at all: no probe series are left.
    store.sync([], BUCKETS, 10)
    exposition.configure({"environment": "staging"}, BUCKETS)
    assert b"canary_probe_" not in assert_identical(store, exposition, metrics)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package 'prometheus')")
def test_promtool_finds_nothing_to_complain_about_in_the_decompressed_body() -> None:
    store, exposition, probes = build(CHUNK + 10)
    metrics = DaemonMetrics(labels={"environment": "prod"})
    metrics.config_loaded(True, len(probes))
    run_round(store, probes, 1)
    run_round(store, probes, 2, every=2)
    body = gzip.decompress(exposition.gzip_exposition(store.records(), store.channels(), prefix=metrics.exposition()))
    checked = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert checked.returncode == 0 and checked.stdout + checked.stderr == b"", checked.stdout + checked.stderr


@pytest.mark.parametrize(("header", "wanted"), [
    ("gzip", True),
    ("gzip, deflate, br", True),
    ("deflate, GZIP;q=0.5", True),
    ("*", True),
    ("x-gzip", True),
    ("", False),
    ("identity", False),
    ("deflate, br", False),
    ("gzip;q=0", False),
    ("gzip; q=0.000, identity", False),
    ("*;q=0", False),
])
def test_accept_encoding_negotiation(header: str, wanted: bool) -> None:
    assert wants_gzip(header) is wanted


async def test_the_endpoint_answers_gzip_with_its_headers_in_both_formats() -> None:
    store, exposition, probes = build(20)
    run_round(store, probes, 1)
    runner, url = await start_app(build_exporter_app(ExporterSources(store, exposition, DaemonMetrics(), lambda: True)))
    openmetrics = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), auto_decompress=False) as session:
            for accept, content_type in (("text/plain", "text/plain; version=0.0.4"),
                                         (openmetrics, "application/openmetrics-text; version=1.0.0")):
                async with session.get(f"{url}/metrics", headers={"Accept": accept, "Accept-Encoding": "gzip"}) as response:
                    assert response.status == 200
                    assert response.headers["Content-Type"].startswith(content_type)
                    assert response.headers["Content-Encoding"] == "gzip"
                    assert "Accept-Encoding" in response.headers["Vary"]
                    text = gzip.decompress(await response.read())
                    assert b'canary_probe_success{channel="email",environment="prod",probe="probe-0001",type="plain"} 1' in text
                    assert text.endswith(b"# EOF\n") == (accept == openmetrics)
                for refused in ("identity", "gzip;q=0"):
                    async with session.get(f"{url}/metrics", headers={"Accept": accept, "Accept-Encoding": refused}) as response:
                        assert "Content-Encoding" not in response.headers
                        assert (await response.read()).startswith(b"# HELP")
    finally:
        await runner.cleanup()


class _RecordingProxy(ThreadingHTTPServer):
    """Passes Prometheus's scrapes through to the daemon untouched, noting each one's Accept and Accept-Encoding and
    the answer's Content-Type and Content-Encoding (so the test knows what Prometheus asked for and ingested)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.seen: list[tuple[str, str, str, str]] = []
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(BaseHTTPRequestHandler):
    server: _RecordingProxy

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=10)
        try:
            conn.request("GET", self.path, headers={k: v for k, v in self.headers.items() if k.lower() != "connection"})
            answer = conn.getresponse()
            body = answer.read()  # http.client leaves a gzip body as it came
            self.server.seen.append((self.headers.get("Accept", ""), self.headers.get("Accept-Encoding", ""),
                                     answer.getheader("Content-Type", ""), answer.getheader("Content-Encoding", "")))
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in ("connection", "transfer-encoding", "content-length", "date", "server"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        finally:
            conn.close()

    def log_message(self, *args: Any) -> None:
        pass


def query(base: str, promql: str) -> list[dict[str, Any]]:
    return prometheus_api(base, "query?query=" + urllib.request.quote(promql))["result"]


def test_a_real_prometheus_scrapes_the_daemon_with_gzip_and_the_series_are_queryable(
    tmp_path: Path, sandbox_process: str
) -> None:
    probes = "".join(f"""
        [[probes]]
        name = "api-{i}"
        type = "http"
        channel = "api"
        url = "{sandbox_process}/health"
    """ for i in range(3))
    config = write_config(tmp_path, f"""
        [daemon]
        interval = "1s"
        timeout = "900ms"
        jitter = "200ms"
        labels = {{ environment = "gzip" }}
        {probes}
        [[probes]]
        name = "closed"
        type = "tcp"
        channel = "cache"
        host = "127.0.0.1"
        port = {free_port()}
    """)
    port = free_port()
    daemon = Process(probe_command("run", "--config", str(config), "--listen", f"127.0.0.1:{port}"), cwd=ROOT)
    proxy = _RecordingProxy(port)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    prometheus = None
    try:
        wait_for_port(port, daemon)
        prometheus, base = start_prometheus(tmp_path / "prometheus", [proxy.server_address[1]])
        wait_for(lambda: len(query(base, 'canary_probe_success{environment="gzip"}')) == 4, timeout=60,
                 what="every probe's canary_probe_success in Prometheus")
        assert proxy.seen and all("gzip" in encodings and encoding == "gzip" for _, encodings, _, encoding in proxy.seen)
        # The format it asked for, compressed (Prometheus asks for OpenMetrics first, the text format as a fallback).
        assert all(content_type.startswith("application/openmetrics-text" if wants_openmetrics(accept) else "text/plain")
                   for accept, _, content_type, _ in proxy.seen), proxy.seen
        success = {r["metric"]["probe"]: r["value"][1] for r in query(base, "canary_probe_success")}
        assert success == {"api-0": "1", "api-1": "1", "api-2": "1", "closed": "0"}
        wait_for(lambda: len(query(base, "canary_probe_latency_seconds_count > 0")) == 4, timeout=30,
                 what="the latency histograms in Prometheus")
        assert query(base, 'canary_probe_failures_total{probe="closed",reason="connect"} > 0')
        assert query(base, 'canary_build_info{environment="gzip"}')  # the daemon's own metrics, in the first member
        assert query(base, 'up{job="channel-canary"} == 1')
    finally:
        if prometheus is not None:
            prometheus.stop()
        proxy.shutdown()
        proxy.server_close()
        daemon.stop()


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
async def test_a_large_scrape_lets_due_work_run_between_its_slices(encoding: str) -> None:
    """3,000 probes laid out afresh and compressed or decompressed: the handler works in slices, so a ticker on
    the same loop keeps ticking through the scrape instead of waiting for all of it; and while the scrape is
    assembled, results keep arriving without spoiling the body."""
    import asyncio
    import gc
    import time

    count = 6000
    store, exposition, probes = build(count)
    run_round(store, probes, 1)
    exposition.gzip_exposition(store.records(), store.channels())  # from now on multi-line fragments are packed
    probes = [settings(i, description="reloaded") for i in range(count)]
    store.sync(probes, BUCKETS, 10)  # new records: the scrape lays them out anew
    run_round(store, probes, 2)
    runner, url = await start_app(build_exporter_app(ExporterSources(store, exposition, DaemonMetrics(), lambda: True)))
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        for round_ in range(100_000):  # bounded; ends with the scrape
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            if round_ % 50 == 0:  # results keep coming in while the scrape is put together
                run_round(store, probes, 3 + round_, every=197)
                last = time.perf_counter()  # the ticker's own work is not the scrape's
            if done.is_set():
                return

    gc.disable()  # a collection's pause is not what this measures
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            tick = asyncio.create_task(ticker())
            started = time.perf_counter()
            async with session.get(f"{url}/metrics", headers={"Accept-Encoding": encoding}) as response:
                body = await response.read()
                assert response.headers.get("Content-Encoding", "identity") == encoding
            took = time.perf_counter() - started
            done.set()
            await tick
    finally:
        gc.enable()
        await runner.cleanup()
    text = gzip.decompress(body) if encoding == "gzip" else body
    assert text.count(b"canary_probe_success{") == count - 1  # every probe that ran once, exactly once
    assert len(gaps) > 10, (len(gaps), took)
    assert max(gaps) < took / 3, (max(gaps), took)  # no single stretch held the loop for most of the scrape


def test_a_reload_during_a_sliced_scrape_is_noticed_not_mixed_in() -> None:
    store, exposition, probes = build(600)
    run_round(store, probes, 1)
    parts = exposition.gzip_parts(store.records(), store.channels())
    taken = [next(parts) for _ in range(3)]  # the scrape is under way…
    exposition.configure({"environment": "staging"}, BUCKETS)  # …when a reload brings new static labels
    from exporter.exposition import StaleLayout

    with pytest.raises(StaleLayout):
        for part in parts:
            taken.append(part)
    body = gzip.decompress(exposition.gzip_exposition(store.records(), store.channels()))
    assert b'environment="staging"' in body and b'environment="prod"' not in body
