"""Runs every probe at its interval, each in its own task, on a fixed grid with a stable per-probe offset.

A probe's runs never overlap: one task per probe runs it, waits, and runs it again. When a run takes longer
than the gap to its next slot, the missed slots are skipped (and counted), not queued. A probe changed by a
reload keeps its rhythm: its first run under the new settings comes one (new) interval after its last one.
The scheduler knows nothing about probe types; it builds probes through the factory it is given.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Protocol

from canary.runner import run_once
from canary.scrub import Scrubber
from canary.state import ResultStore
from canary.contract import Probe, ProbeSettings

log = logging.getLogger("canary.scheduler")
# A slot missed by less than this when a probe starts is run at once (late), not pushed a whole interval on.
JOIN_TOLERANCE = 0.5
# The longest the garbage collector rests while newly started probes make their first run (see `apply`).
FIRST_ROUND_GC_PAUSE = 30.0
# How long a cancelled probe task and a probe's close() may take before they are abandoned: a stop or a
# reload must finish even when a probe (or a library under it) does not let go.
STOP_TIMEOUT = 5.0


class ProbeBuildError(Exception):
    """A probe of a new config could not be built; nothing was changed."""

    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        super().__init__(f"probe {name!r} could not be built: {detail}")


class SchedulerObserver(Protocol):
    def observe_lateness(self, seconds: float) -> None: ...
    def count_skipped(self, name: str, slots: int) -> None: ...


def _freeze_heap(collect: bool = True) -> None:
    """Move long-lived objects (probes, their sessions and settings) out of the garbage collector's sight.

    With 10,000 probes a full collection walks a million objects and stalls the loop for up to half a second,
    which every probe due in that moment sees as lateness. Frozen objects are never walked again. While probes
    are running, freeze without collecting first: that collection would itself be such a stall, and the little
    garbage it would have freed is kept once, not again.
    """
    if collect:
        gc.collect()
    gc.freeze()


def _end_first_round() -> None:
    _freeze_heap(collect=False)
    gc.enable()


def stable_offset(name: str, spread: float) -> float:
    """Where in [0, spread) this probe's slots fall: the same on every start, different across probes."""
    return (zlib.crc32(name.encode()) / 2**32) * spread


@dataclass
class _Running:
    settings: ProbeSettings
    probe: Probe
    task: asyncio.Task[None]
    in_run: bool = False
    retired: bool = False  # stopped by a reload or a stop: it must not start another run
    abandoned: bool = False  # would not stop when cancelled: whatever it still produces is discarded
    last_slot: float | None = None  # the slot of its latest run; for a replacement, that of the task it replaces


class Scheduler:
    def __init__(
        self,
        store: ResultStore,
        build_probe: Callable[[ProbeSettings], Probe],
        observer: SchedulerObserver,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self._store = store
        self._build_probe = build_probe
        self._observer = observer
        self._stop_timeout = stop_timeout
        self._loop = asyncio.get_running_loop()
        self._epoch: float | None = None  # set when the first probes start, so their first slots are now
        self._running: dict[str, _Running] = {}
        self._scrub = Scrubber()
        self._jitter = 0.0
        self._stopping = False
        self._refreeze: asyncio.TimerHandle | None = None
        self._stopping_tasks: list[_Running] = []
        self._abandoned: set[asyncio.Task[None]] = set()  # tasks that would not stop: kept referenced, never awaited

    @property
    def probe_names(self) -> list[str]:
        return list(self._running)

    async def apply(self, probes: tuple[ProbeSettings, ...], jitter: float, scrub: Scrubber) -> None:
        """Start, stop and restart probe tasks so that exactly `probes` run. Unchanged probes keep their slots.

        All-or-nothing: every new or changed probe is built before any running one is touched, so when one cannot
        be built this raises ProbeBuildError and the running set is exactly as it was."""
        jitter_changed = jitter != self._jitter
        wanted = {settings.name: settings for settings in probes}
        stale = [
            name for name, running in self._running.items()
            if jitter_changed or wanted.get(name) != running.settings
        ]
        built = await self._build_all([settings for name, settings in wanted.items()
                                       if name not in self._running or name in stale], scrub)
        if self._refreeze is not None:
            self._refreeze.cancel()
            gc.enable()
        self._scrub = scrub
        self._jitter = jitter
        if stale:
            # Let the probes this change replaces be collected. The collection below then walks the whole heap
            # once (~0.7 s with 10,000 HTTP probes): the price of a reload that changes probes, not of one that
            # changes nothing.
            gc.unfreeze()
        replaced = [self._running.pop(name) for name in stale]
        await self._stop_tasks(replaced, grace=0.0)
        # A changed probe keeps its rhythm: its next run is one (new) interval after its last one started. A new
        # jitter asks for a new spread instead, so then every probe joins the grid afresh.
        last_slots = {} if jitter_changed else {item.settings.name: item.last_slot for item in replaced}
        if self._epoch is None:
            self._epoch = self._loop.time()
        for settings, probe in built:
            running = _Running(settings, probe, task=None, last_slot=last_slots.get(settings.name))  # type: ignore[arg-type]
            running.task = self._loop.create_task(self._loop_probe(running), name=f"probe:{settings.name}")
            self._running[settings.name] = running
        if stale or built:  # a reload that changes nothing costs the loop nothing
            _freeze_heap()
        if built:
            # Probes build their sessions on their first run, inside the jitter window. Collecting while 10,000
            # sessions appear means full passes of 0.2-0.3 s, so the collector rests for that first round
            # (bounded by FIRST_ROUND_GC_PAUSE) and what it built is frozen at the end of it.
            longest = max(settings.interval or 0.0 for settings, _ in built)
            gc.disable()
            self._refreeze = self._loop.call_later(min(jitter, longest, FIRST_ROUND_GC_PAUSE) + 1.0, _end_first_round)

    async def _build_all(self, wanted: list[ProbeSettings], scrub: Scrubber) -> list[tuple[ProbeSettings, Probe]]:
        built: list[tuple[ProbeSettings, Probe]] = []
        for settings in wanted:
            try:
                built.append((settings, self._build_probe(settings)))
            except Exception as exc:  # noqa: BLE001 - any failure to build leaves the running set untouched
                await asyncio.gather(*(self._close(probe, built_settings) for built_settings, probe in built))
                raise ProbeBuildError(settings.name, scrub(f"{type(exc).__name__}: {exc}")) from None
        return built

    async def _loop_probe(self, running: _Running) -> None:
        settings = running.settings
        interval = settings.interval or 30.0
        timeout = settings.timeout or interval
        loop = self._loop
        now = loop.time()
        if running.last_slot is not None:  # replaces a changed probe: not sooner than one interval after its last run
            slot = max(running.last_slot + interval, now)
        else:
            offset = stable_offset(settings.name, min(self._jitter, interval))
            slot = (self._epoch or now) + offset
            if slot < now - JOIN_TOLERANCE:  # added by a reload: its first run within the jitter window, like at a start
                slot = now + offset
        while not (self._stopping or running.retired):
            delay = slot - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lateness = max(loop.time() - slot, 0.0)
            self._observer.observe_lateness(lateness)
            running.last_slot = slot
            running.in_run = True
            try:
                result = await run_once(running.probe, timeout, self._scrub)
            finally:
                running.in_run = False
            if running.abandoned:  # it ignored its cancellation; a newer task may own this name now
                return
            try:
                self._note_transition(settings, result)
                self._store.record(settings.name, result, time.time(), lateness)
            except Exception:  # noqa: BLE001 - a broken listener must not stop this probe's schedule
                log.exception("recording the result of probe %s failed", settings.name)
            slot += interval
            missed = int((loop.time() - slot) // interval)
            if missed > 0:  # whole slots passed during the run: skip them, never queue them
                self._observer.count_skipped(settings.name, missed)
                slot += missed * interval

    def _note_transition(self, settings: ProbeSettings, result) -> None:  # type: ignore[no-untyped-def]
        """Log a failure (ERROR for a critical probe, WARNING for a warning one) or a recovery (INFO), once each,
        with the probe's fields as the record's attributes for the logfmt and json formats."""
        record = self._store.get(settings.name)
        previous = record.latest if record is not None else None
        fields = {
            "probe": settings.name, "channel": settings.channel, "type": settings.type, "severity": settings.severity,
            "reason": result.reason, "duration_seconds": round(result.duration_seconds, 6),
        }
        if result.success and previous is not None and not previous.success:
            log.info("probe %s recovered (channel %s)", settings.name, settings.channel, extra=fields)
        elif not result.success and (previous is None or previous.success or previous.reason != result.reason):
            log.log(
                logging.ERROR if settings.severity == "critical" else logging.WARNING,
                "probe %s failed (channel %s, reason %s): %s",
                settings.name, settings.channel, result.reason, result.message, extra=fields,
            )

    async def stop(self, grace: float) -> None:
        """Let runs in flight finish for up to `grace` seconds, then cancel what is left (see `hurry`)."""
        self._stopping = True
        if self._refreeze is not None:
            self._refreeze.cancel()
            gc.enable()
        running = list(self._running.values())
        self._running.clear()
        await self._stop_tasks(running, grace)

    def hurry(self) -> None:
        """Cancel every task a stop is still waiting for, at once (a second SIGTERM)."""
        for item in self._stopping_tasks:
            item.task.cancel()

    async def _stop_tasks(self, running: list[_Running], grace: float) -> None:
        """Stop these tasks, bounded in time: after `grace`, cancel; after the stop timeout more, abandon."""
        if not running:
            return
        self._stopping_tasks = running
        for item in running:
            item.retired = True
            if not item.in_run or grace <= 0:
                item.task.cancel()
        busy = {item.task for item in running if not item.task.done()}
        if busy and grace > 0:
            _, busy = await asyncio.wait(busy, timeout=grace)
            for task in busy:
                task.cancel()
        if busy:
            # A run cancelled while it cleans up finishes the cleanup first (bounded by its own cleanup timeout).
            cleanup = max(item.settings.cleanup_bound() for item in running if item.task in busy)
            _, stuck = await asyncio.wait(busy, timeout=self._stop_timeout + cleanup)
            for item in running:
                item.abandoned = item.task in stuck
            for task in stuck:
                log.warning("%s did not stop within %gs of being cancelled; abandoned", task.get_name(), self._stop_timeout)
                self._abandoned.add(task)
                task.add_done_callback(self._abandoned.discard)
        self._stopping_tasks = []
        for item in running:
            if item.task.done() and not item.task.cancelled() and item.task.exception() is not None:
                log.error("%s ended with %s", item.task.get_name(), self._scrub(repr(item.task.exception())))
        await asyncio.gather(*(self._close(item.probe, item.settings) for item in running))

    async def _close(self, probe: Probe, settings: ProbeSettings) -> None:
        name = settings.name
        try:
            async with asyncio.timeout(self._stop_timeout + settings.cleanup_bound()):  # close() awaits cleanups
                await probe.close()
        except Exception as exc:  # noqa: BLE001 - closing one probe must not stop the others closing
            log.warning("probe %s did not close cleanly: %s", name, self._scrub(f"{type(exc).__name__}: {exc}"))
