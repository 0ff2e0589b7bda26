"""`probe run`: load the config, schedule every probe, serve the exporter, reload on SIGHUP, stop on SIGTERM.

Reloads are all-or-nothing: a broken file is logged and counted in `canary_config_last_reload_successful`,
and the last good config keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Callable, Mapping

from aiohttp import web

from canary.config import Config, ConfigError, load_config
from canary.scheduler import Scheduler
from canary.scrub import Scrubber, ScrubbingFilter
from canary.state import ResultStore
from exporter.exposition import ProbeExposition
from exporter.self_metrics import DaemonMetrics
from exporter.server import OPEN_PATHS, ExporterSources, build_exporter_app
from exporter.web_security import WebSecurity
from probes.base import Probe, ProbeSettings

log = logging.getLogger("canary.daemon")


def configure_logging(level: str, scrubber: Scrubber) -> ScrubbingFilter:
    """Log to stderr through a filter that scrubs every record; returns the filter so reloads can update it."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    scrub_filter = ScrubbingFilter(scrubber)
    handler.addFilter(scrub_filter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aiokafka logs every refused connection at ERROR; the Kafka probes report those themselves, once per run.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    return scrub_filter


class Daemon:
    def __init__(
        self,
        config: Config,
        probe_types: Mapping[str, type[Probe]],
        build_probe: Callable[[ProbeSettings], Probe],
        listen: str | None = None,
        web_security: WebSecurity | None = None,
    ) -> None:
        self.config = config
        self._probe_types = probe_types
        self._build_probe = build_probe
        self._listen = listen or config.daemon.listen
        self.web = web_security or WebSecurity(None)
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._ready = False
        self.metrics = DaemonMetrics()
        self.store = ResultStore(config.daemon.latency_buckets, config.daemon.history)
        self.exposition = ProbeExposition(config.daemon.labels, config.daemon.latency_buckets)
        self.store.add_listener(self.exposition.render)
        self._scrub_filter = configure_logging(config.daemon.log_level, config.scrubber())

    async def serve(self) -> int:
        scheduler = Scheduler(self.store, self._build_probe, self.metrics)
        await self._apply(self.config, scheduler)
        self.metrics.config_loaded(True, len(self.config.probes))

        app = build_exporter_app(ExporterSources(self.store, self.exposition, self.metrics, lambda: self._ready))
        self.web.install(app, OPEN_PATHS)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, _, port = self._listen.rpartition(":")
        try:
            await web.TCPSite(runner, host.strip("[]") or None, int(port), shutdown_timeout=1.0, ssl_context=self.web.ssl_context).start()
        except OSError as exc:
            log.error("cannot listen on %s: %s", self._listen, exc.strerror or exc)
            await scheduler.stop(0)
            await runner.cleanup()
            return 1

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload(scheduler)))
        for stop_signal in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(stop_signal, self._stop.set)
        self._ready = True
        log.info(
            "channel-canary serving on %s://%s (%d probes from %s)", self.web.scheme, self._listen, len(self.config.probes), self.config.path
        )
        await self._stop.wait()

        self._ready = False
        grace = self.config.daemon.shutdown_grace
        log.info("stopping: letting runs in flight finish (up to %gs)", grace)
        await scheduler.stop(grace)
        await runner.cleanup()
        for handled in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(handled)
        log.info("stopped")
        return 0

    async def reload(self, scheduler: Scheduler) -> bool:
        async with self._reload_lock:
            try:
                config = load_config(self.config.path, self._probe_types)
                web_config = self.web.load()
            except ConfigError as exc:
                self.metrics.config_loaded(False)
                log.error("config reload failed; the last good config keeps running:\n%s", exc)
                return False
            await self._apply(config, scheduler)
            self.web.apply(web_config)
            self.config = config
            self.metrics.config_loaded(True, len(config.probes))
            log.info("config reloaded: %d probes", len(config.probes))
            return True

    async def _apply(self, config: Config, scheduler: Scheduler) -> None:
        daemon = config.daemon
        self._scrub_filter.scrubber = config.scrubber()
        self.store.sync(config.probes, daemon.latency_buckets, daemon.history)
        self.exposition.configure(daemon.labels, daemon.latency_buckets)
        await scheduler.apply(config.probes, daemon.jitter, config.scrubber())
        if daemon.listen != self.config.daemon.listen:
            log.warning("the listen address changed to %s; it takes effect on restart", daemon.listen)

