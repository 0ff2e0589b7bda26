"""`probe run`: load the config, schedule every probe (of its shard), serve the exporter, reload on SIGHUP, stop on SIGTERM.

Reloads are all-or-nothing: a broken file is logged and counted in `canary_config_last_reload_successful`,
and the last good config keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Callable, Generator, Mapping, TypeVar

from aiohttp import web

from canary.logs import formatter
from canary.probe_state import ProbeStateBook
from canary.config import Config, ConfigError, load_config_steps
from canary.janitor import Janitor
from canary.ledger import Ledger, building_with
from canary.libraries import import_off_loop
from canary.saturation import Pacer, release
from canary.scheduler import ProbeBuildError, Scheduler
from canary.scrub import Scrubber, ScrubbingFilter
from canary.sharding import EVERYTHING, Shard, select
from canary.state import ResultStore
from canary.statedir import state_directory
from canary.uptime import UptimeBook
from exporter.exposition import ProbeExposition
from exporter.self_metrics import DaemonMetrics
from exporter.server import OPEN_PATHS, ExporterSources, build_exporter_app
from exporter.web_security import WebSecurity
from canary.contract import RUNNER_REASONS, Probe, ProbeSettings, parse_host_port

log = logging.getLogger("canary.daemon")
T = TypeVar("T")


async def paced(steps: Generator[None, None, T]) -> T:
    """Runs a `*_steps` generator on the loop a slice at a time, letting the probes that are due run in between:
    loading 10,000 probes is 1-2 s of work. (Not in a thread: uvloop takes the GIL back for every callback, so a
    thread parsing beside it holds up each one.)"""
    pacer = Pacer()
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        await pacer.step()


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
        self._importing: asyncio.Task[None] | None = None  # the configured types' libraries, in a worker thread
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
        # What outlives the process: the flag's directory, else the config's, else this config and shard's default.
        self.state_dir = state_directory(state_dir, config.daemon.state_dir, config.path, shard)
        # The status page's uptime buckets, and what the probes learnt between runs (watch expiries, back-offs, windows).
        self.uptime = UptimeBook.in_directory(self.state_dir)
        self.probe_state = ProbeStateBook.in_directory(self.state_dir)
        self.store.add_listener(self.uptime.observe)
        self._log_level = log_level  # --log.level: wins over [daemon] log_level, at start and on every reload
        self._scrub_filter = configure_logging(log_level or config.daemon.log_level, config.scrubber(), log_format)
        # What runs created on the platform, until removed (canary/ledger.py); the janitor removes the leftovers.
        # Opened once logging is set up: it says what an earlier process left behind.
        self.ledger = Ledger.in_directory(self.state_dir)
        self.janitor = Janitor(self.ledger, build_probe)
        self.metrics.watch_leftovers(lambda: self.ledger.counts(
            record.settings.name for record in self.store.records() if record.settings.leaves_objects()
        ))

    async def serve(self) -> int:
        """Run until SIGTERM/SIGINT; the exit code: 0 stopped, 1 cannot listen, 2 a probe could not be built."""
        # Probes the first load builds take what the previous process saved for them; reloads hand state over themselves.
        # Probes whose runs create objects get their part of the ledger.
        build = building_with(self.ledger, self._build_probe)
        scheduler = Scheduler(self.store, lambda settings: self.probe_state.restored(settings, build(settings)),
                              self.metrics)
        self.metrics.watch(scheduler.monitor.lag, scheduler.monitor.ratio, lambda: scheduler.in_flight)
        # Handlers first: a SIGHUP's default action would kill a daemon still starting, and a SIGTERM then is a stop.
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._reload_in_background, scheduler)
        for stop_signal in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(stop_signal, self._on_stop_signal, scheduler)
        self.uptime.load()  # before the first run records; _apply drops the buckets of probes no longer configured
        self.probe_state.load()  # before the first build, so every probe's first run already knows it
        try:
            with scheduler.collector_resting():
                running = await self._apply(self.config, scheduler)
        except ProbeBuildError as exc:
            log.error("%s: %s", self.config.path, exc)
            await self.ledger.close()
            return 2
        self.probe_state.started()
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
            await self.ledger.close()
            return 1

        self._ready = True
        log.info(
            "channel-canary serving on %s://%s (%d probes from %s%s)", self.web.scheme, self._listen, running, self.config.path,
            "" if self.shard == EVERYTHING else f", shard {self.shard}",
        )
        saver = asyncio.create_task(self.uptime.save_every(), name="save-uptime")
        state_saver = asyncio.create_task(self.probe_state.save_every(scheduler.probes), name="save-probe-state")
        # Leftovers of any configured probe (some may be another shard's now); sweeps of this shard's probes only.
        janitor = asyncio.create_task(self.janitor.run(
            lambda: (self.config.probes, [record.settings for record in self.store.records()])
        ), name="janitor")
        self._import_libraries()
        await self._stop.wait()

        self._ready = False
        # Both signals may be handled before this resumes, when hurry() had no stop to hurry yet.
        grace = 0.0 if self._hurried else self.config.daemon.shutdown_grace
        log.info("stopping: letting runs in flight finish (up to %gs)", grace)
        janitor.cancel()  # a removal cut short stays in the ledger, for the next start
        probes = scheduler.probes()  # their state is saved once the runs the stop lets finish have ended
        await scheduler.stop(grace)
        saver.cancel()
        state_saver.cancel()
        await asyncio.gather(saver, state_saver, janitor, *([self._importing] if self._importing else []),
                             return_exceptions=True)
        self.uptime.save()  # the runs since the last periodic save, including those the stop let finish
        self.probe_state.save(probes)
        await self.ledger.close()  # after the stop: the runs it let finish settled their entries
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
                with scheduler.collector_resting():
                    config = await paced(load_config_steps(self.config.path, self._probe_types))
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
            previous, self.config = list(self.config.probes), config
            await release(previous)  # the settings nothing else holds now, a few at a time
            self.metrics.config_loaded(True, running)
            log.info("config reloaded: %d probes", running)
            self._import_libraries()  # of a type the reload added
            return True

    def _import_libraries(self) -> None:
        """Import the libraries of every configured probe type in a worker thread, once the daemon is listening.

        Start-up does not wait for them (that is most of its import time); the first runs of a type then find them
        imported rather than waiting (off the loop) for the runner to import them."""
        names = dict.fromkeys(
            name for record in self.store.records() for name in self._probe_types[record.settings.type].libraries
        )
        if names and (self._importing is None or self._importing.done()):
            self._importing = asyncio.get_running_loop().create_task(self._import(list(names)), name="import-libraries")

    async def _import(self, names: list[str]) -> None:
        try:
            await import_off_loop(names)
        except Exception as exc:  # noqa: BLE001 - each run of the types concerned fails with this too, as `internal`
            log.error("cannot import a probe type's library: %s: %s", type(exc).__name__, exc)

    async def _apply(self, config: Config, scheduler: Scheduler) -> int:
        """Switch to `config` (this shard's share of its probes), or raise ProbeBuildError having changed nothing.
        Returns how many probes now run.

        The scheduler builds every new probe before it stops any old one; the store and the exposition follow once
        everything is built, before the scheduler stops or starts any task (with no await in between, so no new run
        can record before its record exists, and no replaced run records after)."""
        daemon = config.daemon
        probes = select(config.probes, self.shard.index, self.shard.count)
        # The records of new and changed probes, made (and their series rendered) between the runs that are due.
        pending = self.store.prepare(probes, daemon.latency_buckets, daemon.history)
        pacer = Pacer()
        for record in pending.steps():
            self.exposition.render(record)
            await pacer.step()

        retired: list[object] = []

        def follow() -> None:  # once every probe is built, before any task stops or starts (no await in between)
            retired.extend(pending.apply())
            self.exposition.configure(daemon.labels, daemon.latency_buckets)
            self.metrics.set_labels(daemon.labels)
            self.uptime.keep(record.settings.name for record in self.store.records())

        await scheduler.apply(probes, daemon.jitter, config.scrubber(), before_start=follow)
        await release(retired)  # the replaced records, a few at a time
        self._scrub_filter.scrubber = config.scrubber()
        logging.getLogger().setLevel((self._log_level or daemon.log_level).upper())
        if daemon.listen != self.config.daemon.listen:
            log.warning("the listen address changed to %s; it takes effect on restart", daemon.listen)
        if daemon.shard != self.config.daemon.shard:
            log.warning("daemon.shard changed to %s; the shard is chosen at start, so it takes effect on restart", daemon.shard)
        return len(probes)

