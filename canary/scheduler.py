"""Runs every probe at its interval, each in its own task, on a fixed grid with a stable per-probe offset.

A probe's runs never overlap: one task per probe runs it, waits, and runs it again. When a run takes longer
than the gap to its next slot, the missed slots are skipped (and counted), not queued. A probe changed by a
reload keeps its rhythm: its first run under the new settings comes one (new) interval after its last one, and
its state (see `canary.probe_state`) when it is about the same thing.
The scheduler knows nothing about probe types; it builds probes through the factory it is given.

Nothing long runs on the loop while probes are due. A start or a reload builds, starts and stops probes in slices
of a few milliseconds (`Pacer`), the most urgent first, and never collects the whole heap: what it built is
frozen out of the collector's sight instead (see `apply`). When the process cannot keep up all the same, its own
slowness must not look like the targets' (canary/saturation.py): a slot that comes while the loop is far behind is
skipped (counted with reason "saturated"), and a run that timed out while the loop was behind is `starved`, not
failed, and leaves the probe's verdict as it was.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from canary.probe_state import hand_over
from canary.runner import run_once
from canary.saturation import LoopMonitor, Pacer, judge, readable_lag, release, shed_after
from canary.scrub import Scrubber
from canary.state import ResultStore
from canary.contract import Probe, ProbeSettings, format_duration

log = logging.getLogger("canary.scheduler")
# A slot missed by less than this when a probe starts is run at once (late), not pushed a whole interval on.
JOIN_TOLERANCE = 0.5
# The longest the garbage collector rests while newly started probes make their first run (see `apply`).
FIRST_ROUND_GC_PAUSE = 30.0
# How long a cancelled probe task and a probe's close() may take before they are abandoned: a stop or a
# reload must finish even when a probe (or a library under it) does not let go.
STOP_TIMEOUT = 5.0
SATURATION_LOG_EVERY = 60.0  # at most one warning a minute while the loop is saturated


class ProbeBuildError(Exception):
    """A probe of a new config could not be built; nothing was changed."""

    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        super().__init__(f"probe {name!r} could not be built: {detail}")


class SchedulerObserver(Protocol):
    def observe_lateness(self, seconds: float) -> None: ...
    def count_skipped(self, name: str, slots: int, reason: str) -> None: ...  # reason: "overrun" or "saturated"
    def count_starved(self, name: str) -> None: ...


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
    superseded: bool = False  # retired by a reload: its settings are gone, so whatever it still produces is discarded
    abandoned: bool = False  # would not stop when cancelled: whatever it still produces is discarded
    last_slot: float | None = None  # the slot of its latest run (its replacement keeps the rhythm from it)
    first_slot: float = 0.0  # when a new task runs first
    predecessor: "_Running | None" = None  # the task of the same name a reload replaced: it must end first
    waiter: "asyncio.Future[None] | None" = None  # set while it waits for its next slot: `_retire` wakes it


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
        self.monitor = LoopMonitor()  # how far behind the loop runs (canary/saturation.py)
        self._in_flight = 0
        self._saturation = _SaturationLog(self.monitor)

    @property
    def probe_names(self) -> list[str]:
        return list(self._running)

    def probes(self) -> list[tuple[ProbeSettings, Probe]]:
        """The running probes with their settings, e.g. to save their state."""
        return [(item.settings, item.probe) for item in self._running.values()]

    @property
    def in_flight(self) -> int:
        """Runs under way now."""
        return self._in_flight

    async def apply(
        self, probes: tuple[ProbeSettings, ...], jitter: float, scrub: Scrubber, before_start: Callable[[], None] | None = None
    ) -> None:
        """Start, stop and restart probe tasks so that exactly `probes` run. Unchanged probes keep their slots.

        All-or-nothing: every new or changed probe is built before any running one is touched, so when one cannot
        be built this raises ProbeBuildError and the running set is exactly as it was. `before_start` is called once
        everything is built, before any task is stopped or started and with no await in between: the daemon syncs
        its result store there, so no run of a new probe records before its record exists.

        The heap is never collected here: with 10,000 probes that walks a million objects (~0.7 s) while probes are
        due. The collector rests while the probes are built and through their first round (bounded by
        FIRST_ROUND_GC_PAUSE), and what they built is frozen (`gc.freeze()`, which costs nothing) after each. A probe
        a reload replaces was frozen with the rest and is freed by its reference count, not by a collection."""
        jitter_changed = jitter != self._jitter
        wanted = {settings.name: settings for settings in probes}
        resting = self._refreeze is not None
        gc.disable()
        try:
            stale: set[str] = set()  # a set: 10,000 names looked up in a list took 0.4 s
            pacer = Pacer()
            for name, running in list(self._running.items()):  # comparing 10,000 settings takes a while too
                if jitter_changed or wanted.get(name) != running.settings:
                    stale.add(name)
                await pacer.step()
            built = await self._build_all([settings for name, settings in wanted.items()
                                           if name not in self._running or name in stale], scrub)
        except BaseException:
            if not resting:
                gc.enable()
            raise
        if self._stopping:  # a stop came while building: nothing new starts
            await self._close_all([(probe, settings) for settings, probe in built])
            if not resting:
                gc.enable()
            return
        self._scrub = scrub
        self._jitter = jitter
        self.monitor.start()
        now = self._loop.time()
        epoch = now if self._epoch is None else self._epoch
        # A changed probe keeps its rhythm: its next run is one (new) interval after its last one started. A new
        # jitter asks for a new spread instead, so then every probe joins the grid afresh. Made before the switch
        # (a few at a time), so the switch itself is short.
        fresh = []
        for settings, probe in built:
            previous = self._running.get(settings.name) if settings.name in stale else None
            running = _Running(settings, probe, task=None, predecessor=previous)  # type: ignore[arg-type]
            running.first_slot = self._first_slot(running, now, epoch, jitter_changed)
            fresh.append(running)
            await pacer.step()
        # The switch. From here to the first task started there is no await: no replaced task records after the
        # store followed (`before_start`), and no new one before.
        replaced = {name: self._running.pop(name) for name in stale}
        for item in replaced.values():
            item.retired = item.superseded = True
        if before_start is not None:
            before_start()
        self._epoch = epoch
        # The most urgent first, each right after the task it replaces is retired, so the switch is done well before
        # the probes it concerns are due.
        fresh.sort(key=lambda item: item.first_slot)
        for position, running in enumerate(fresh):
            if self._stopping:  # a stop came while starting: what has not started never will
                await self._close_all([(item.probe, item.settings) for item in fresh[position:]])
                break
            if running.predecessor is not None:
                self._retire(running.predecessor)
                # Its last run may have come while the switch was being prepared: the rhythm counts from that one.
                running.first_slot = self._first_slot(running, self._loop.time(), epoch, jitter_changed)
            running.task = self._loop.create_task(self._loop_probe(running), name=f"probe:{running.settings.name}")
            self._running[running.settings.name] = running
            await pacer.step()
        retired = list(replaced.values())
        replaced.clear()
        await self._stop_tasks(retired, grace=0.0)
        await release(retired)  # with their probes and settings, a few at a time
        if built:
            gc.freeze()
            if self._refreeze is not None:
                self._refreeze.cancel()
            longest = max(settings.interval or 0.0 for settings, _ in built)
            self._refreeze = self._loop.call_later(min(jitter, longest, FIRST_ROUND_GC_PAUSE) + 1.0, self._end_rest)
        elif not resting:
            gc.enable()

    @contextmanager
    def collector_resting(self) -> Iterator[None]:
        """The garbage collector rests for the length of the block, e.g. while a reload loads a config and applies
        it: 10,000 new settings, probes and records would make it walk them again and again (stalls of 0.1-0.5 s,
        in a loading thread too, since it holds the GIL). An apply in the block that built probes keeps it resting
        through their first round; otherwise it works again once the block ends."""
        resting = self._refreeze is not None
        gc.disable()
        try:
            yield
        finally:
            if self._refreeze is None and not resting:
                gc.enable()

    def _end_rest(self) -> None:
        """The first round of the probes last started is over: freeze what it built and let the collector work."""
        self._refreeze = None
        gc.freeze()
        gc.enable()

    def _first_slot(self, running: _Running, now: float, epoch: float, jitter_changed: bool) -> float:
        settings = running.settings
        interval = settings.interval or 30.0
        last_slot = running.predecessor.last_slot if running.predecessor is not None and not jitter_changed else None
        if last_slot is not None:  # replaces a changed probe: not sooner than one interval after its last run
            return max(last_slot + interval, now)
        offset = stable_offset(settings.name, min(self._jitter, interval))
        slot = epoch + offset
        if slot < now - JOIN_TOLERANCE:  # added by a reload: its first run within the jitter window, like at a start
            slot = now + offset
        return slot

    async def _build_all(self, wanted: list[ProbeSettings], scrub: Scrubber) -> list[tuple[ProbeSettings, Probe]]:
        built: list[tuple[ProbeSettings, Probe]] = []
        pacer = Pacer()
        for settings in wanted:
            try:
                built.append((settings, self._build_probe(settings)))
            except Exception as exc:  # noqa: BLE001 - any failure to build leaves the running set untouched
                await self._close_all([(probe, built_settings) for built_settings, probe in built])
                raise ProbeBuildError(settings.name, scrub(f"{type(exc).__name__}: {exc}")) from None
            await pacer.step()
        return built

    async def _loop_probe(self, running: _Running) -> None:
        settings = running.settings
        interval = settings.interval or 30.0
        timeout = settings.timeout or interval
        shed = shed_after(timeout)
        loop = self._loop
        slot = running.first_slot
        if running.predecessor is not None:
            await self._take_over(running)
            slot = max(slot, loop.time())
        while not (self._stopping or running.retired):
            if slot > loop.time():
                await self._wait_for(running, slot)
                if self._stopping or running.retired:
                    return
            now = loop.time()
            lateness = max(now - slot, 0.0)
            if lateness >= shed and self.monitor.recent_lag() >= shed:
                # The loop itself has stayed far behind for a second (not one stall, not only this task): a run
                # started now would spend its timeout queueing behind the others. Skip the slot, and let the runs
                # under way finish.
                slot = self._skip(settings.name, slot + interval, interval, now, "saturated", already=1)
                continue
            self._observer.observe_lateness(lateness)
            running.last_slot = slot
            running.in_run = True
            self._in_flight += 1
            reading = self.monitor.reading()
            try:
                result = await run_once(running.probe, timeout, self._scrub)
            finally:
                running.in_run = False
                self._in_flight -= 1
            if running.abandoned or running.superseded:  # a newer task owns this name now, or none does
                return
            result = judge(result, timeout, self.monitor, reading)
            if result.reason == "starved":
                self._observer.count_starved(settings.name)
                self._saturation.starved()
            try:
                if result.reason != "starved":
                    self._note_transition(settings, result)
                self._store.record(settings.name, result, time.time(), lateness)
            except Exception:  # noqa: BLE001 - a broken listener must not stop this probe's schedule
                log.exception("recording the result of probe %s failed", settings.name)
            slot = self._skip(settings.name, slot + interval, interval, loop.time(),
                              "saturated" if result.reason == "starved" else "overrun")

    def _skip(self, name: str, slot: float, interval: float, now: float, reason: str, already: int = 0) -> float:
        """`slot` moved past every whole interval that has passed by `now`: those slots (and `already` more) are
        skipped and counted, never queued. A slot passed by less than an interval still runs, late."""
        passed = max(int((now - slot) // interval), 0)
        if passed + already > 0:
            self._observer.count_skipped(name, passed + already, reason)
            if reason == "saturated":
                self._saturation.skipped(passed + already)
        return slot + passed * interval

    async def _take_over(self, running: _Running) -> None:
        """Before its first run, a replacement waits (bounded) for the task it replaces to end (runs never overlap),
        then takes over its state (see `canary.probe_state`), which is final by then."""
        previous, running.predecessor = running.predecessor, None
        if previous is None:
            return
        if not previous.task.done():
            await asyncio.wait({previous.task}, timeout=self._stop_timeout + previous.settings.cleanup_bound())
        hand_over(previous.settings, previous.probe, running.settings, running.probe)

    async def _wait_for(self, running: _Running, slot: float) -> None:
        """Sleeps until `slot`, unless `_retire` wakes it first.

        A retired task that waits for its next slot is woken, not cancelled: it then ends like any function, while a
        cancelled one leaves a CancelledError whose traceback holds its frame in a reference cycle. Made while the
        collector rests and frozen after it, 10,000 of those (and the probes their frames hold) would never be freed."""
        waiter = running.waiter = self._loop.create_future()
        timer = self._loop.call_at(slot, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            running.waiter = None

    def _retire(self, item: _Running) -> None:
        """No more runs: a task waiting for its slot is woken to end; one in a run is cancelled."""
        item.retired = True
        if item.waiter is not None:
            _wake(item.waiter)
        elif not item.task.done() and not item.task.cancelling():
            item.task.cancel()

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
            self._refreeze = None
        gc.enable()
        running = list(self._running.values())
        self._running.clear()
        await self._stop_tasks(running, grace)
        self.monitor.stop()

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
        pacer = Pacer()  # each retired task takes a step in the loop's next pass: not 10,000 in one
        for item in running:
            if not item.in_run or grace <= 0:
                self._retire(item)
                await pacer.step()
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
        await self._close_all([(item.probe, item.settings) for item in running])

    async def _close_all(self, probes: list[tuple[Probe, ProbeSettings]]) -> None:
        """Close these probes side by side, started a slice at a time."""
        closing = []
        pacer = Pacer()
        for probe, settings in probes:
            closing.append(self._loop.create_task(self._close(probe, settings)))
            await pacer.step()
        for task in closing:  # one at a time: gathering 10,000 at once is itself a long step
            await task
        await release(closing)  # type: ignore[arg-type]

    async def _close(self, probe: Probe, settings: ProbeSettings) -> None:
        name = settings.name
        try:
            async with asyncio.timeout(self._stop_timeout + settings.cleanup_bound()):  # close() awaits cleanups
                await probe.close()
        except Exception as exc:  # noqa: BLE001 - closing one probe must not stop the others closing
            log.warning("probe %s did not close cleanly: %s", name, self._scrub(f"{type(exc).__name__}: {exc}"))


def _wake(waiter: "asyncio.Future[None]") -> None:
    if not waiter.done():
        waiter.set_result(None)


class _SaturationLog:
    """One warning a minute at most while the loop is saturated, never one per probe (that would add to the load)."""

    def __init__(self, monitor: LoopMonitor) -> None:
        self._monitor = monitor
        self._skipped = 0
        self._starved = 0
        self._logged = float("-inf")

    def skipped(self, slots: int) -> None:
        self._skipped += slots
        self._maybe_log()

    def starved(self) -> None:
        self._starved += 1
        self._maybe_log()

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._logged < SATURATION_LOG_EVERY:
            return
        since = "" if self._logged == float("-inf") else f" in the last {format_duration(round(now - self._logged))}"
        log.warning(
            "this process cannot keep up: its event loop is up to %s behind (saturation %.2f); %d slots skipped and %d "
            "runs starved%s. Starved runs are no verdict and change no probe's state; run fewer probes per process "
            "(shards) or give it more CPU",
            readable_lag(self._monitor.lag()), self._monitor.ratio(), self._skipped, self._starved, since,
        )
        self._logged, self._skipped, self._starved = now, 0, 0
