"""The exporter under test for part 3, in its own process so its RSS is the exporter's alone.

    python bench/scrape_server.py --port 9466 --probes 10000

Fills a ResultStore with `--probes` probes' results (a mix like a large deployment: http probes with phases
and channel maps, postgres probes with gauges, a few failing ones), serves exporter/server.py's app on
127.0.0.1, and adds three benchmark-only routes beside the product's own:
    POST /_bench/churn   record one new result for every probe (the steady state between two scrapes)
    GET  /_bench/render  time the /metrics body built in-process, without HTTP (?reps=N; ?gzip=1: the gzip body,
                         and whether it decompresses to the plain body built at the same moment)
    GET  /_bench/stats   VmRSS / VmHWM and the RSS at each stage
Ends on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import gzip
import json
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import hwm_mb, rss_mb  # noqa: E402

STAGES: dict[str, float] = {"imports (python + aiohttp + prometheus_client)": rss_mb()}

from aiohttp import web  # noqa: E402

from canary.config import DEFAULT_BUCKETS  # noqa: E402
from canary.contract import Gauge, Result  # noqa: E402
from canary.state import ResultStore  # noqa: E402
from exporter.exposition import ProbeExposition  # noqa: E402
from exporter.self_metrics import DaemonMetrics  # noqa: E402
from exporter.server import ExporterSources, build_exporter_app  # noqa: E402
from probes.http import HttpSettings  # noqa: E402
from probes.postgres import PostgresSettings  # noqa: E402

STATIC_LABELS = {"environment": "production"}
CHANNELS = ("api", "email", "whatsapp", "web_form", "sms", "chat", "voice", "database", "search", "billing")
PLATFORM_CHANNELS = {"email": "active", "whatsapp": "active", "web_form": "active"}


def build_settings(count: int) -> list:  # type: ignore[type-arg]
    """80% http, 15% postgres, 5% http probes that will fail; a third carry an extra static label."""
    settings = []
    for i in range(count):
        labels = {"team": f"team{i % 7}"} if i % 3 == 0 else {}
        channel = CHANNELS[i % len(CHANNELS)]
        if i % 20 < 3:
            settings.append(PostgresSettings(
                name=f"db-{i:05d}", channel="database", dsn="postgresql://canary@db.internal:5432/app",
                interval="30s", timeout="5s", health_checks=True, labels=labels,
            ))
        else:
            settings.append(HttpSettings(
                name=f"http-{i:05d}", channel=channel, url=f"https://tenant{i}.support.example.com/health",
                interval="15s", timeout="5s", expect_json={"status": "healthy"}, labels=labels,
                channel_map="channels" if i % 10 == 1 else None,
            ))
    return settings


def result_for(index: int, settings, rng: random.Random) -> Result:  # type: ignore[no-untyped-def]
    duration = rng.uniform(0.005, 0.4)
    if settings.type == "postgres":
        return Result.ok(
            "SELECT 1 answered; 12 connections of 100",
            duration_seconds=duration,
            phases={"connect": duration * 0.6, "query": duration * 0.3, "health": duration * 0.1},
            gauges=(
                Gauge("postgres_connections", rng.randint(5, 90), "Client connections open on the server."),
                Gauge("postgres_max_connections", 100, "The server's max_connections setting."),
                Gauge("postgres_long_running_queries", rng.randint(0, 3), "Queries running longer than the probe's long_query_threshold."),
                Gauge("postgres_ungranted_locks", rng.randint(0, 2), "Lock requests waiting to be granted."),
            ),
        )
    if index % 20 == 19:  # 5% fail: timeouts and refused connections, so failures_total has series
        reason = "timeout" if rng.random() < 0.5 else "connect"
        return Result.fail(reason, "no answer within 5s during first_byte", duration_seconds=duration,
                           phases={"dns": 0.001, "connect": duration * 0.2})
    channels = {name: rng.random() > 0.01 for name in PLATFORM_CHANNELS} if settings.channel_map else {}
    return Result.ok(
        "HTTP 200 OK, 97 bytes",
        duration_seconds=duration,
        phases={"dns": duration * 0.05, "connect": duration * 0.1, "tls": duration * 0.3,
                "first_byte": duration * 0.5, "transfer": duration * 0.05},
        channels=channels,
    )


def populate(count: int, runs_each: int = 3, seed: int = 7) -> tuple[ResultStore, ProbeExposition, list]:  # type: ignore[type-arg]
    settings = build_settings(count)
    store = ResultStore(DEFAULT_BUCKETS, 30)
    store.sync(settings, DEFAULT_BUCKETS, 30)
    exposition = ProbeExposition(STATIC_LABELS, DEFAULT_BUCKETS)
    store.add_listener(exposition.render)
    rng = random.Random(seed)
    now = time.time()
    for run in range(runs_each):
        for index, probe in enumerate(settings):
            store.record(probe.name, result_for(index, probe, rng), now - (runs_each - run) * 15, rng.uniform(0, 0.003))
    return store, exposition, settings


def _reset_peak_rss() -> bool:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so a later peak is the scrape's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


async def serve(port: int, count: int) -> None:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    store, exposition, settings = populate(count)
    populate_seconds = time.perf_counter() - wall0
    populate_cpu = time.process_time() - cpu0
    metrics = DaemonMetrics()
    metrics.config_loaded(True, count)
    for i in range(1000):
        metrics.observe_lateness(i / 1e6)
    gc.collect()
    STAGES[f"store + cached exposition for {count} probes"] = rss_mb()
    rng = random.Random(11)

    sources = ExporterSources(store, exposition, metrics, lambda: True)
    app = build_exporter_app(sources)

    async def churn(request: web.Request) -> web.Response:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        now = time.time()
        for index, probe in enumerate(settings):
            store.record(probe.name, result_for(index, probe, rng), now, rng.uniform(0, 0.003))
        return web.json_response({"wall_seconds": time.perf_counter() - wall0, "cpu_seconds": time.process_time() - cpu0,
                                  "results": len(settings)})

    async def render(request: web.Request) -> web.Response:
        reps = min(int(request.query.get("reps", "5")), 50)
        build = exposition.gzip_exposition if request.query.get("gzip") else exposition.exposition
        times, size = [], 0
        for _ in range(reps):
            started = time.perf_counter()
            body = build(store.records(), store.channels(), prefix=metrics.exposition())
            times.append(time.perf_counter() - started)
            size = len(body)
            del body
        identical = None
        if request.query.get("gzip"):
            prefix = metrics.exposition()  # the same prefix for both, so the bodies can be compared byte for byte
            plain = exposition.exposition(store.records(), store.channels(), prefix=prefix)
            identical = gzip.decompress(exposition.gzip_exposition(store.records(), store.channels(), prefix=prefix)) == plain
        return web.json_response({"seconds": times, "bytes": size, "identical": identical})

    async def stats(request: web.Request) -> web.Response:
        if request.query.get("reset_peak"):
            gc.collect()
            return web.json_response({"reset": _reset_peak_rss(), "rss_mb": rss_mb()})
        return web.json_response({"rss_mb": rss_mb(), "hwm_mb": hwm_mb(), "stages": STAGES,
                                  "populate_wall_seconds": populate_seconds, "populate_cpu_seconds": populate_cpu,
                                  "gc_counts": gc.get_count()})

    app.router.add_post("/_bench/churn", churn)
    app.router.add_get("/_bench/render", render)
    app.router.add_get("/_bench/stats", stats)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, shutdown_timeout=0.5).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": port}), flush=True)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--probes", type=int, default=10_000)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, args.probes))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port, args.probes))


if __name__ == "__main__":
    main()
