"""The daemon's HTTP face: /metrics, /healthz, /readyz, / (status page), /status.json and POST /-/reload."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from time import perf_counter
from typing import Awaitable, Callable, Iterator

from aiohttp import web

from canary.state import ResultStore
from canary.uptime import UptimeBook
from exporter.exposition import ProbeExposition, StaleLayout
from exporter.self_metrics import DaemonMetrics
from exporter.status_page import render_status_page, status_json

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@dataclass
class ExporterSources:
    """What the endpoints read. They never write: results flow in only through the store."""

    store: ResultStore
    probe_exposition: ProbeExposition
    daemon_metrics: DaemonMetrics
    is_ready: Callable[[], bool]
    uptime: UptimeBook | None = None  # hourly buckets for the status page's uptime figures; None shows none
    # What `POST /-/reload` runs: the same reload as SIGHUP, answering None when it applied, else why it did not.
    reload: Callable[[], Awaitable[str | None]] | None = None


SOURCES = web.AppKey("sources", ExporterSources)
SCRAPES = web.AppKey("scrapes", asyncio.Lock)  # one scrape assembled at a time: they share the exposition's cache
# How long a scrape works before it lets the event loop run due probes: a whole scrape of 10,000 probes is
# 50-150 ms of work (0.4 s after a reload), which every probe due meanwhile would see as lateness.
SCRAPE_SLICE_SECONDS = 0.002
# Open even when the web config asks for basic auth: kubelet liveness and readiness probes cannot send credentials.
# Everything else, /-/reload included, asks for the same credentials as /metrics.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def build_exporter_app(sources: ExporterSources) -> web.Application:
    app = web.Application()
    app[SOURCES] = sources
    app[SCRAPES] = asyncio.Lock()
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/status.json", _status_json)
    app.router.add_get("/", _status_page)
    if sources.reload is not None:
        app.router.add_post("/-/reload", _reload)
    return app


def wants_openmetrics(accept: str) -> bool:
    """Whether a scraper's Accept header asks for OpenMetrics (and does not refuse it with q=0)."""
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        if media.lower() == "application/openmetrics-text":
            return not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params)
    return False


def wants_gzip(accept_encoding: str) -> bool:
    """Whether a scraper's Accept-Encoding takes gzip (named, or `*`), not refused with q=0. Prometheus sends `gzip`."""
    taken: dict[str, bool] = {}
    for item in accept_encoding.split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        refused = any(p.replace(" ", "").lower() in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params)
        taken[coding.lower()] = not refused
    return taken.get("gzip", taken.get("x-gzip", taken.get("*", False)))


async def _assembled(parts: Iterator[bytes]) -> bytes:
    """The body from its parts, letting the loop run between slices of SCRAPE_SLICE_SECONDS."""
    body: list[bytes] = []
    deadline = perf_counter() + SCRAPE_SLICE_SECONDS
    for part in parts:
        body.append(part)
        if perf_counter() >= deadline:
            await asyncio.sleep(0)
            deadline = perf_counter() + SCRAPE_SLICE_SECONDS
    return b"".join(body)


async def _metrics(request: web.Request) -> web.Response:
    sources = request.app[SOURCES]
    openmetrics = wants_openmetrics(request.headers.get("Accept", ""))
    compressed = wants_gzip(request.headers.get("Accept-Encoding", ""))
    exposition = sources.probe_exposition
    parts = exposition.gzip_parts if compressed else exposition.exposition_parts
    async with request.app[SCRAPES]:
        records, channels = sources.store.records(), sources.store.channels()
        prefix = sources.daemon_metrics.exposition(openmetrics)
        try:
            body = await _assembled(parts(records, channels, prefix, openmetrics))
        except StaleLayout:  # a reload laid the probes out anew meanwhile: this once, all in one go
            body = b"".join(parts(sources.store.records(), sources.store.channels(), prefix, openmetrics))
    # Vary on both: a cache must not hand a gzip body to a client that cannot read it, nor one format for the other.
    headers = {"Content-Type": OPENMETRICS_CONTENT_TYPE if openmetrics else METRICS_CONTENT_TYPE, "Vary": "Accept, Accept-Encoding"}
    if compressed:
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


async def _reload(request: web.Request) -> web.Response:
    reload = request.app[SOURCES].reload
    assert reload is not None  # the route exists only with one
    error = await reload()
    if error is None:
        return web.Response(text="config reloaded\n")
    return web.Response(status=500, text=f"config reload failed; the last good config keeps running:\n{error}\n")


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    if request.app[SOURCES].is_ready():
        return web.Response(text="ready\n")
    return web.Response(status=503, text="not ready: config not loaded or scheduler not running\n")


async def _status_json(request: web.Request) -> web.Response:
    sources = request.app[SOURCES]
    store = sources.store
    return web.json_response(status_json(store.records(), store.channels(), sources.uptime))


async def _status_page(request: web.Request) -> web.Response:
    sources = request.app[SOURCES]
    store = sources.store
    return web.Response(
        text=render_status_page(store.records(), store.channels(), sources.uptime), content_type="text/html",
        headers={"Cache-Control": "no-store"},
    )
