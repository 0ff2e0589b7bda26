"""The daemon's HTTP face: /metrics, /healthz, /readyz, / (status page) and /status.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from aiohttp import web

from canary.state import ResultStore
from canary.uptime import UptimeBook
from exporter.exposition import ProbeExposition
from exporter.self_metrics import DaemonMetrics
from exporter.status_page import render_status_page, status_json

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class ExporterSources:
    """What the endpoints read. They never write: results flow in only through the store."""

    store: ResultStore
    probe_exposition: ProbeExposition
    daemon_metrics: DaemonMetrics
    is_ready: Callable[[], bool]
    uptime: UptimeBook | None = None  # hourly buckets for the status page's uptime figures; None shows none


SOURCES = web.AppKey("sources", ExporterSources)
# Open even when the web config asks for basic auth: kubelet liveness and readiness probes cannot send credentials.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def build_exporter_app(sources: ExporterSources) -> web.Application:
    app = web.Application()
    app[SOURCES] = sources
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/status.json", _status_json)
    app.router.add_get("/", _status_page)
    return app


async def _metrics(request: web.Request) -> web.Response:
    sources = request.app[SOURCES]
    body = sources.probe_exposition.exposition(
        sources.store.records(), sources.store.channels(), prefix=sources.daemon_metrics.exposition()
    )
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


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
