"""Part 3: /metrics with 10,000 probes — scrape time, size and the exporter's memory, plain and gzip side by side.

The exporter (exporter/server.py's app over a filled ResultStore) runs in its own process
(bench/scrape_server.py); this process scrapes it over HTTP like Prometheus would, one connection per scrape,
once without and once with `Accept-Encoding: gzip` (what Prometheus sends). The gzip body is timed until its
last byte arrived, not decompressed (Prometheus decompresses as it parses).
Then, for comparison, prometheus_client's generate_latest over the same series built as GaugeMetricFamily.
"""

from __future__ import annotations

import gzip
import http.client
import json
import shutil
import subprocess
import sys
import time

from common import (
    BENCH_DIR, HOST, Children, free_port, heading, line, median, note, percentile, verdict, wait_for_port,
)

PROBES = 10_000
TARGET_SCRAPE = 0.100
TARGET_GZIP_SCRAPE = 0.060
TARGET_GZIP_BYTES = 8e6
TARGET_RSS_MB = 250.0


def _request(port: int, method: str, path: str, timeout: float = 60.0, compressed: bool = False) -> tuple[int, bytes, float]:
    """(status, body as sent, seconds until its last byte); `compressed` asks for gzip as Prometheus does."""
    headers = {"Accept": "text/plain;version=0.0.4"}
    if compressed:
        headers["Accept-Encoding"] = "gzip"
    started = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        if compressed and response.getheader("Content-Encoding") != "gzip":
            raise RuntimeError(f"{path} answered Accept-Encoding: gzip with Content-Encoding {response.getheader('Content-Encoding')!r}")
        return response.status, body, time.perf_counter() - started
    finally:
        conn.close()


def _scrapes(port: int, count: int, compressed: bool) -> tuple[list[float], bytes]:
    times, body = [], b""
    for _ in range(count):
        status, body, seconds = _request(port, "GET", "/metrics", compressed=compressed)
        if status != 200:
            raise RuntimeError(f"/metrics answered HTTP {status}")
        times.append(seconds)
    return times, body


def _json(port: int, method: str, path: str) -> dict:  # type: ignore[type-arg]
    status, body, _ = _request(port, method, path)
    if status != 200:
        raise RuntimeError(f"{method} {path}: HTTP {status}: {body[:200]!r}")
    return json.loads(body)


def _count(body: bytes) -> tuple[int, int]:
    text = body.decode()
    series = sum(1 for row in text.splitlines() if row and not row.startswith("#"))
    families = text.count("\n# TYPE ") + text.startswith("# TYPE ")
    return series, families


def _promtool(body: bytes) -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        return "skipped (promtool not on PATH)"
    try:
        done = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=180)
    except subprocess.TimeoutExpired:
        return "no verdict within 180 s"
    output = (done.stdout + done.stderr).decode(errors="replace").strip().splitlines()
    if done.returncode == 0 and not output:
        return "ok (exit 0, no lint findings)"
    return f"exit {done.returncode}: " + " | ".join(output[:5]) + (f" ... ({len(output)} lines)" if len(output) > 5 else "")


def _generate_latest_comparison(count: int) -> None:
    """The same series through prometheus_client: a custom collector yielding GaugeMetricFamily, generate_latest."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from exporter.exposition import CORE_FAMILIES
    from scrape_server import STATIC_LABELS, populate

    store, _, _ = populate(count)
    records = store.records()

    class StoreCollector:
        def collect(self):  # type: ignore[no-untyped-def]
            for name, _, help_text in CORE_FAMILIES:
                if name == "canary_probe_latency_seconds":
                    families = {suffix: GaugeMetricFamily(f"{name}{suffix}", help_text) for suffix in ("_bucket", "_sum", "_count")}
                else:
                    families = {"": GaugeMetricFamily(name, help_text)}
                for record in records:
                    settings, result = record.settings, record.latest
                    base = {**STATIC_LABELS, **settings.labels, "probe": settings.name, "channel": settings.channel, "type": settings.type}
                    if name == "canary_probe_success" and result is not None:
                        families[""].add_sample(name, base, 1.0 if result.success else 0.0)
                    elif name == "canary_probe_duration_seconds" and result is not None:
                        families[""].add_sample(name, base, result.duration_seconds)
                    elif name == "canary_probe_attempts" and result is not None:
                        families[""].add_sample(name, base, result.attempts)
                    elif name == "canary_probe_phase_duration_seconds" and result is not None:
                        for phase, seconds in sorted(result.phases.items()):
                            families[""].add_sample(name, {**base, "phase": phase}, seconds)
                    elif name == "canary_probe_last_run_timestamp_seconds" and result is not None:
                        families[""].add_sample(name, base, record.last_run_time)
                    elif name == "canary_probe_last_success_timestamp_seconds" and result is not None:
                        families[""].add_sample(name, base, record.last_success_time)
                    elif name == "canary_probe_interval_seconds":
                        families[""].add_sample(name, base, settings.interval or 0.0)
                    elif name == "canary_probe_runs_total":
                        for outcome, runs in record.runs.items():
                            families[""].add_sample(name, {**base, "result": outcome}, runs)
                    elif name == "canary_probe_failures_total":
                        for reason, runs in sorted(record.failures.items()):
                            families[""].add_sample(name, {**base, "reason": reason}, runs)
                    elif name == "canary_probe_latency_seconds":
                        cumulative = 0
                        for le, hits in zip([*map(str, store.buckets), "+Inf"], record.bucket_counts):
                            cumulative += hits
                            families["_bucket"].add_sample(f"{name}_bucket", {**base, "le": le}, cumulative)
                        families["_sum"].add_sample(f"{name}_sum", base, record.latency_sum)
                        families["_count"].add_sample(f"{name}_count", base, cumulative)
                yield from (family for family in families.values() if family.samples)
            gauge_families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
            for record in records:
                if record.latest is None:
                    continue
                settings = record.settings
                base = {**STATIC_LABELS, **settings.labels, "probe": settings.name, "channel": settings.channel, "type": settings.type}
                for gauge in record.latest.gauges:
                    family_name = f"canary_probe_{gauge.name}"  # prometheus-client adds a counter's _total
                    kind = CounterMetricFamily if gauge.kind == "counter" else GaugeMetricFamily
                    family = gauge_families.setdefault(family_name, kind(family_name, gauge.help))
                    family.add_sample(gauge.family, {**base, **dict(gauge.labels)}, gauge.value)
            yield from gauge_families.values()
            channels = GaugeMetricFamily("canary_channel_up", "channel up", labels=["environment", "channel", "importance"])
            for channel, state in sorted(store.channels().items()):
                channels.add_metric([STATIC_LABELS["environment"], channel, state.importance], 1.0 if state.up else 0.0)
            yield channels

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector())
    times, collect_times, size, series = [], [], 0, 0
    for _ in range(3):
        started = time.perf_counter()
        families = list(registry.collect())
        collect_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        body = generate_latest(registry)
        times.append(time.perf_counter() - started)
        size = len(body)
        series = sum(len(f.samples) for f in families)
        del body, families
    line("prometheus_client generate_latest (custom collector, GaugeMetricFamily)",
         f"median {median(times) * 1000:.0f} ms (collect alone {median(collect_times) * 1000:.0f} ms); "
         f"{series} series, {size / 1e6:.1f} MB; {median(times) / series * 1e6:.2f} µs/series")


def run(scrapes: int) -> None:
    heading(f"3. /metrics with {PROBES} probes: {scrapes} scrapes over HTTP from another process")
    with Children() as children:
        port = free_port()
        server = children.start(
            [sys.executable, str(BENCH_DIR / "scrape_server.py"), "--port", str(port), "--probes", str(PROBES)],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(port, server, timeout=300)
        stats = _json(port, "GET", "/_bench/stats")
        line("exporter process", f"pid {server.pid}, http://{HOST}:{port}/metrics")
        line("store filled (3 results per probe, each rendered on record)",
             f"{stats['populate_wall_seconds']:.2f} s wall ({stats['populate_wall_seconds'] / (3 * PROBES) * 1e6:.0f} µs per recorded result)")
        for stage, rss in stats["stages"].items():
            line(f"RSS after {stage}", f"{rss:.0f} MB")

        _json(port, "GET", "/_bench/stats?reset_peak=1")
        status, body, first = _request(port, "GET", "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered HTTP {status}")
        series, families = _count(body)
        line("first scrape (not counted)", f"{first * 1000:.0f} ms")
        times, body = _scrapes(port, scrapes, compressed=False)
        p50 = percentile(times, 50)
        line("series / families / bytes", f"{series} series in {families} families, {len(body) / 1e6:.2f} MB ({len(body) / series:.0f} bytes/series)")
        histogram = sum(1 for row in body.split(b"\n") if row.startswith(b"canary_probe_latency_seconds"))
        line("of which canary_probe_latency_seconds (histogram)", f"{histogram} series ({histogram / series * 100:.0f}%)")
        line(f"plain scrape time over HTTP (n={scrapes})", f"p50 {p50 * 1000:.1f} ms, max {max(times) * 1000:.1f} ms, min {min(times) * 1000:.1f} ms")
        line("target: plain scrape < 100 ms (p50)", f"{p50 * 1000:.1f} ms  [{verdict(p50 < TARGET_SCRAPE)}]")
        rendered = _json(port, "GET", "/_bench/render?reps=5")
        line("of which building the body in-process (no HTTP)", f"median {median(rendered['seconds']) * 1000:.1f} ms, max {max(rendered['seconds']) * 1000:.1f} ms")
        stats = _json(port, "GET", "/_bench/stats")
        line("RSS after the plain scrapes / peak during them (VmHWM)", f"{stats['rss_mb']:.0f} MB / {stats['hwm_mb']:.0f} MB")

        status, zipped, first = _request(port, "GET", "/metrics", compressed=True)
        line("first gzip scrape (compresses every fragment once; not counted)", f"{first * 1000:.0f} ms")
        times, zipped = _scrapes(port, scrapes, compressed=True)
        gz50 = percentile(times, 50)
        plain_size = len(gzip.decompress(zipped))
        line("gzip body", f"{len(zipped) / 1e6:.2f} MB ({plain_size / len(zipped):.1f}x smaller than its {plain_size / 1e6:.2f} MB)")
        line(f"gzip scrape time over HTTP (n={scrapes})", f"p50 {gz50 * 1000:.1f} ms, max {max(times) * 1000:.1f} ms, min {min(times) * 1000:.1f} ms")
        line("target: gzip scrape < 60 ms (p50), body < 8 MB",
             f"{gz50 * 1000:.1f} ms, {len(zipped) / 1e6:.2f} MB  [{verdict(gz50 < TARGET_GZIP_SCRAPE and len(zipped) < TARGET_GZIP_BYTES)}]")
        rendered = _json(port, "GET", "/_bench/render?reps=5&gzip=1")
        line("of which building the gzip body in-process (no HTTP)", f"median {median(rendered['seconds']) * 1000:.1f} ms, max {max(rendered['seconds']) * 1000:.1f} ms")
        line("gzip body decompresses to the plain body, byte for byte", "yes" if rendered["identical"] else "NO")
        stats = _json(port, "GET", "/_bench/stats")
        line("RSS after the gzip scrapes / peak since the first scrape (VmHWM)", f"{stats['rss_mb']:.0f} MB / {stats['hwm_mb']:.0f} MB")

        for round_ in range(1, 4):
            churned = _json(port, "POST", "/_bench/churn")
            _, zipped, zipped_seconds = _request(port, "GET", "/metrics", compressed=True)
            status, body, seconds = _request(port, "GET", "/metrics")
            line(f"steady state {round_}: all {PROBES} results changed, then a gzip and a plain scrape",
                 f"gzip {zipped_seconds * 1000:.1f} ms ({len(zipped) / 1e6:.2f} MB) [{verdict(zipped_seconds < TARGET_GZIP_SCRAPE)}], "
                 f"plain {seconds * 1000:.1f} ms; recording+rendering the "
                 f"{churned['results']} results took {churned['cpu_seconds'] * 1000:.0f} ms CPU "
                 f"({churned['cpu_seconds'] / churned['results'] * 1e6:.0f} µs each, spread over the interval in the daemon)")
        note("a plain scrape after the first gzip one decompresses the multi-line fragments (kept compressed only "
             "from then on, for memory)")
        stats = _json(port, "GET", "/_bench/stats")
        line("exporter RSS now / peak since the first scrape (VmHWM)", f"{stats['rss_mb']:.0f} MB / {stats['hwm_mb']:.0f} MB")
        peak = max(stats["hwm_mb"], stats["rss_mb"])
        line("target: RSS < 250 MB (peak)", f"{peak:.0f} MB  [{verdict(peak < TARGET_RSS_MB)}]")
        line("promtool check metrics (last plain scrape)", _promtool(body))
        line("promtool check metrics (last gzip scrape, decompressed)", _promtool(gzip.decompress(zipped)))
        children.stop(server)

    note("comparison in this (driver) process, on the same store contents:")
    _generate_latest_comparison(PROBES)
