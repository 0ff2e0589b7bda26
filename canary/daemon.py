"""`probe run`: load the config, schedule every probe (of its shard), serve the exporter, reload on SIGHUP, stop on SIGTERM.

Reloads are all-or-nothing: a broken file is logged and counted in `canary_config_last_reload_successful`,
and the last good config keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Callable, Mapping

from aiohttp import web

from canary.logs import formatter
from canary.config import Config, ConfigError, load_config
from canary.scheduler import ProbeBuildError, Scheduler
from canary.scrub import Scrubber, ScrubbingFilter
from canary.sharding import EVERYTHING, Shard, select
from canary.state import ResultStore
from canary.uptime import UptimeBook
from exporter.exposition import ProbeExposition
from exporter.self_metrics import DaemonMetrics
from exporter.server import OPEN_PATHS, ExporterSources, build_exporter_app
from exporter.web_security import WebSecurity
from canary.contract import RUNNER_REASONS, Probe, ProbeSettings, parse_host_port

log = logging.getLogger("canary.daemon")


def configure_logging(level: str, scrubber: Scrubber, log_format: str = "text") -> ScrubbingFilter:
    """Log to stderr through a filter that scrubs every record; returns the filter so reloads can update it.

    The filter sits on the handler, so it runs before the formatter (text, logfmt or json) renders anything."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
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
        state_dir: str | None = None,
        shard: Shard = EVERYTHING,
        log_level: str | None = None,
        log_format: str = "text",
    ) -> None:
        self.config = config
        self.shard = shard  # fixed for the process's life; every (re)load runs only this shard's probes
        self._probe_types = probe_types
        self._build_probe = build_probe
        self._listen = listen or config.daemon.listen
        self.web = web_security or WebSecurity(None)
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[bool]] = set()  # reloads started by SIGHUP, referenced until done
        self._ready = False
        self.last_reload_error = ""  # why the last reload failed, for POST /-/reload's answer
        self._hurried = False  # a second stop signal came: the stop must not wait for runs in flight
        self.metrics = DaemonMetrics(shard.index, shard.count, config.daemon.labels)
        self.store = ResultStore(
            config.daemon.latency_buckets, config.daemon.history,
            reasons_for=lambda type_name: (*RUNNER_REASONS, *probe_types[type_name].reasons),
        )
        self.exposition = ProbeExposition(config.daemon.labels, config.daemon.latency_buckets)
        self.store.add_listener(self.exposition.render)
        # The status page's uptime buckets, saved under the state directory (the flag's, else the config's).
        self.uptime = UptimeBook.in_directory(state_dir or config.daemon.state_dir)
        self.store.add_listener(self.uptime.observe)
        self._log_level = log_level  # --log.level: wins over [daemon] log_level, at start and on every reload
        self._scrub_filter = configure_logging(log_level or config.daemon.log_level, config.scrubber(), log_format)

    async def serve(self) -> int:
        """Run until SIGTERM/SIGINT; the exit code: 0 stopped, 1 cannot listen, 2 a probe could not be built."""
        scheduler = Scheduler(self.store, self._build_probe, self.metrics)
        # Handlers first: a SIGHUP's default action would kill a daemon still starting, and a SIGTERM then is a stop.
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._reload_in_background, scheduler)
        for stop_signal in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(stop_signal, self._on_stop_signal, scheduler)
        self.uptime.load()  # before the first run records; _apply drops the buckets of probes no longer configured
        try:
            running = await self._apply(self.config, scheduler)
        except ProbeBuildError as exc:
            log.error("%s: %s", self.config.path, exc)
            return 2
        self.metrics.config_loaded(True, running)

        app = build_exporter_app(
            ExporterSources(self.store, self.exposition, self.metrics, lambda: self._ready, uptime=self.uptime,
                            reload=lambda: self._reload_from_web(scheduler))
        )
        self.web.install(app, OPEN_PATHS)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, port = parse_host_port(self._listen)
        try:
            await web.TCPSite(runner, host, port, shutdown_timeout=1.0, ssl_context=self.web.ssl_context).start()
        except OSError as exc:
            log.error("cannot listen on %s: %s", self._listen, exc.strerror or exc)
            await scheduler.stop(0)
            await runner.cleanup()
            return 1

        self._ready = True
        log.info(
            "channel-canary serving on %s://%s (%d probes from %s%s)", self.web.scheme, self._listen, running, self.config.path,
            "" if self.shard == EVERYTHING else f", shard {self.shard}",
        )
        saver = asyncio.create_task(self.uptime.save_every(), name="save-uptime")
        await self._stop.wait()

        self._ready = False
        # Both signals may be handled before this resumes, when hurry() had no stop to hurry yet.
        grace = 0.0 if self._hurried else self.config.daemon.shutdown_grace
        log.info("stopping: letting runs in flight finish (up to %gs)", grace)
        await scheduler.stop(grace)
        saver.cancel()
        await asyncio.gather(saver, return_exceptions=True)
        self.uptime.save()  # the runs since the last periodic save, including those the stop let finish
        await runner.cleanup()
        for handled in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(handled)
        return 0  # `probe run` logs "stopped" once the event loop is closed too

    def _reload_in_background(self, scheduler: Scheduler) -> None:
        task = asyncio.get_running_loop().create_task(self.reload(scheduler), name="reload")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_stop_signal(self, scheduler: Scheduler) -> None:
        """The first SIGTERM stops gracefully; a second one during the grace cancels every run at once."""
        if self._stop.is_set():
            log.warning("second stop signal: cancelling the runs still in flight")
            self._hurried = True
            scheduler.hurry()
        self._stop.set()

    async def _reload_from_web(self, scheduler: Scheduler) -> str | None:
        """`POST /-/reload`: the SIGHUP reload; None when it applied, else its (scrubbed) error."""
        return None if await self.reload(scheduler) else self.config.scrubber()(self.last_reload_error)

    async def reload(self, scheduler: Scheduler) -> bool:
        async with self._reload_lock:
            try:
                config = load_config(self.config.path, self._probe_types)
                web_config = self.web.load()
                running = await self._apply(config, scheduler)
            except (ConfigError, ProbeBuildError) as exc:
                self.metrics.config_loaded(False)
                where = "" if isinstance(exc, ConfigError) else f"{self.config.path}: "
                self.last_reload_error = f"{where}{exc}"
                log.error("config reload failed; the last good config keeps running:\n%s", self.last_reload_error)
                return False
            self.web.apply(web_config)
            if config.daemon.state_dir != self.config.daemon.state_dir:
                log.warning("daemon.state_dir changed; the state directory is chosen at start, so it takes effect on restart")
            self.config = config
            self.metrics.config_loaded(True, running)
            log.info("config reloaded: %d probes", running)
            return True

    async def _apply(self, config: Config, scheduler: Scheduler) -> int:
        """Switch to `config` (this shard's share of its probes), or raise ProbeBuildError having changed nothing.
        Returns how many probes now run.

        The scheduler builds every new probe before it stops any old one; the store and the exposition follow only
        once it has switched (with no await in between, so no new run can record before its record exists)."""
        daemon = config.daemon
        probes = select(config.probes, self.shard.index, self.shard.count)
        await scheduler.apply(probes, daemon.jitter, config.scrubber())
        self._scrub_filter.scrubber = config.scrubber()
        logging.getLogger().setLevel((self._log_level or daemon.log_level).upper())
        self.store.sync(probes, daemon.latency_buckets, daemon.history)
        self.exposition.configure(daemon.labels, daemon.latency_buckets)
        self.metrics.set_labels(daemon.labels)
        self.uptime.keep(record.settings.name for record in self.store.records())
        if daemon.listen != self.config.daemon.listen:
            log.warning("the listen address changed to %s; it takes effect on restart", daemon.listen)
        if daemon.shard != self.config.daemon.shard:
            log.warning("daemon.shard changed to %s; the shard is chosen at start, so it takes effect on restart", daemon.shard)
        return len(probes)

