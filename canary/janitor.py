"""Removes what probes' runs left on the platform: the ledger's leftovers, and what the sweeps find.

On start and then periodically (every RETRY_EVERY, or sooner when an entry falls due), each leftover of the ledger
(canary/ledger.py) is handed to a probe built from the current config (`Probe.remove_leftover`), and its entry is
dropped once the platform answered 2xx or 404. An entry falls due once no run can still own it: at once for this
process's runs that have settled; for another process's (a killed predecessor, or `probe --once` beside the daemon),
once it is older than its probe's longest run (`timeout` + its cleanup bound + the scheduler's stop timeout), so a
run in flight elsewhere never sees its object vanish. An entry whose probe is no longer configured stays, counted,
and is logged once: it goes when the probe comes back, or by hand (README, "Leftovers").

A probe whose settings have a `sweep_interval()` is also asked, that often, to list its synthetic objects on the
platform (`Probe.find_leftovers`); each one the ledger does not hold yet is added to it and removed like any
leftover, so even an object whose create never answered (a kill between the request and its answer) goes.

The janitor knows no probe type: it only calls what canary/contract.py declares.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from typing import Awaitable, Callable, Sequence

from canary.contract import Probe, ProbeSettings, format_duration
from canary.ledger import Entry, Ledger

log = logging.getLogger("canary.janitor")

RETRY_EVERY = 60.0  # how often a leftover the platform would not remove is tried again
MAX_PER_PASS = 50  # removals per probe and pass, so a backlog reaches the platform as a trickle, not a burst
MIN_PAUSE = 1.0
RUN_MARGIN = 5.0  # the scheduler's STOP_TIMEOUT: how long a cancelled run may still go on before it is abandoned

ProbeSource = Callable[[], tuple[Sequence[ProbeSettings], Sequence[ProbeSettings]]]


class Janitor:
    def __init__(
        self, ledger: Ledger, build_probe: Callable[[ProbeSettings], Probe], retry_every: float = RETRY_EVERY,
    ) -> None:
        self._ledger = ledger
        self._build = build_probe
        self._retry_every = retry_every
        self._next_sweep: dict[str, float] = {}  # probe name → monotonic time its next sweep is due
        self._unknown: set[str] = set()  # probes whose leftovers could not be removed for want of their config

    async def run(self, probes: ProbeSource) -> None:
        """Clean until cancelled. `probes()` gives, at each pass, every configured probe and the ones to sweep."""
        while True:
            try:
                delay = await self.clean(*probes())
            except Exception:  # noqa: BLE001 - a bug here must not end the cleaning for the daemon's life
                log.exception("removing leftover synthetic objects failed")
                delay = self._retry_every
            await asyncio.sleep(delay)

    async def clean(self, configured: Sequence[ProbeSettings], sweeping: Sequence[ProbeSettings] = ()) -> float:
        """One pass: remove every due leftover of `configured` probes, and run the sweeps of `sweeping` that are due.
        Returns how many seconds until the next pass is due."""
        by_name = {settings.name: settings for settings in configured if settings.leaves_objects()}
        now, mono = time.time(), time.monotonic()
        wake = mono + self._retry_every
        due: dict[str, list[Entry]] = {}
        for entry in self._ledger.entries():
            settings = by_name.get(entry.probe)
            if settings is None:
                self._report_unconfigured(entry.probe)
                continue
            ready = self._due_at(entry, settings, now, mono)
            if ready <= mono:
                due.setdefault(entry.probe, []).append(entry)
            else:
                wake = min(wake, ready)
        self._unknown &= {entry.probe for entry in self._ledger.entries()} - set(by_name)
        for name, entries in due.items():
            await self._with_probe(by_name[name], lambda probe, found=entries: self._remove(probe, found))
        sweeping = [s for s in sweeping if s.leaves_objects() and s.sweep_interval()]
        self._next_sweep = {s.name: self._next_sweep.get(s.name, 0.0) for s in sweeping}
        for settings in sweeping:
            if self._next_sweep[settings.name] <= time.monotonic():
                await self._with_probe(settings, lambda probe: self._sweep(probe, time.time()))
                self._next_sweep[settings.name] = time.monotonic() + (settings.sweep_interval() or self._retry_every)
            wake = min(wake, self._next_sweep[settings.name])
        return max(wake - time.monotonic(), MIN_PAUSE)

    def _due_at(self, entry: Entry, settings: ProbeSettings, now: float, mono: float) -> float:
        """The monotonic time from which the entry may be removed without harming a run that may still own it."""
        if entry.owner == self._ledger.owner and not self._ledger.in_flight(entry):
            ready = mono
        else:
            longest_run = (settings.timeout or 0.0) + settings.cleanup_bound() + RUN_MARGIN
            ready = mono + (entry.created + longest_run - now)
        if entry.attempts:
            ready = max(ready, entry.last_attempt + self._retry_every)
        return ready

    def _report_unconfigured(self, name: str) -> None:
        if name in self._unknown:
            return
        self._unknown.add(name)
        count = sum(entry.probe == name for entry in self._ledger.entries())
        log.warning(
            "the ledger %s holds %d objects probe %s created, but no probe of that name that creates objects is "
            "configured: they stay (counted in canary_orphaned_objects) until it is, or until removed by hand",
            self._ledger.path or "(in memory)", count, name,
        )

    async def _with_probe(self, settings: ProbeSettings, work: Callable[[Probe], Awaitable[None]]) -> None:
        """Build a probe of the current config for `work`, and close it after."""
        try:
            probe = self._build(settings)
        except Exception as exc:  # noqa: BLE001 - the config was valid; a build failing is a bug, logged
            log.error("cannot build probe %s to remove its leftovers: %s: %s", settings.name, type(exc).__name__, exc)
            return
        try:
            await work(probe)
        finally:
            await probe.close()

    async def _remove(self, probe: Probe, entries: list[Entry]) -> None:
        for entry in entries[:MAX_PER_PASS]:
            entry.attempts += 1
            entry.last_attempt = time.monotonic()
            try:
                problem = await probe.remove_leftover(entry.variables)
            except Exception as exc:  # noqa: BLE001 - a probe's bug must not stop the other removals
                problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                await self._ledger.drop(entry.probe, entry.run_id)
                log.info("removed what run %s of probe %s left on the platform", entry.run_id, entry.probe)
            elif entry.attempts == 1:
                log.warning("cannot remove what run %s of probe %s left on the platform: %s; trying again every %s",
                            entry.run_id, entry.probe, problem, format_duration(self._retry_every))
            else:
                log.debug("still cannot remove what run %s of probe %s left: %s", entry.run_id, entry.probe, problem)

    async def _sweep(self, probe: Probe, now: float) -> None:
        name = probe.settings.name
        found, problem = await probe.find_leftovers(now)
        if problem:
            log.warning("probe %s: the sweep for synthetic objects failed: %s", name, problem)
        known = [entry.variables for entry in self._ledger.entries() if entry.probe == name]
        new = [variables for variables in found if variables not in known][:MAX_PER_PASS]
        if not new:
            return
        log.warning("probe %s: the sweep found %d synthetic objects no ledger knew of; removing them", name, len(new))
        run_ids = []
        for variables in new:
            run_id = "sweep-" + hashlib.sha256(json.dumps(variables, sort_keys=True).encode()).hexdigest()[:12]
            await self._ledger.record(name, run_id, variables, in_flight=False)
            run_ids.append(run_id)
        entries = [entry for entry in self._ledger.entries() if entry.probe == name and entry.run_id in run_ids]
        await self._remove(probe, entries)

