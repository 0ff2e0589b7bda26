"""Runs one probe once under its timeout and turns whatever happens into a Result.

This is the only place that catches a probe's exceptions: a hang becomes `timeout`, a crash or a
malformed return becomes `internal`, and every message and check text is scrubbed of secrets and made printable
(messages quote what targets sent, control characters included). Cancellation passes through.
A probe that cleans up after itself finishes its (bounded) cleanup before it lets the timeout's cancellation
through, so its run can end up to its `cleanup_timeout` after `timeout` (see `probes/cleanup.py`).
A probe with `retries` makes several such attempts within that same timeout (see `canary/retries.py`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from time import perf_counter

from canary.contract import format_duration, PhaseTimer, printable, Probe, Result
from canary.libraries import import_off_loop
from canary.retries import with_retries
from canary.scrub import Scrubber

log = logging.getLogger("canary.runner")
MAX_MESSAGE_LENGTH = 500


async def run_once(probe: Probe, timeout: float, scrub: Scrubber) -> Result:
    """One run: one attempt, or with the probe's `retries` as many as its transient failures and `timeout` allow."""
    try:
        # Free once imported. The first run of a type waits for its libraries outside its clock and timeout,
        # while the loop goes on (the daemon has usually imported them already, after it started listening).
        await import_off_loop(type(probe).libraries)
    except Exception as exc:  # noqa: BLE001 - an ImportError, or whatever a broken library raises as it is imported
        return Result.fail("internal", f"the libraries of probe type {probe.settings.type} cannot be imported: "
                                       f"{type(exc).__name__}: {exc}")
    retries = probe.settings.retries or 0
    if retries <= 0:
        return await run_attempt(probe, timeout, scrub)
    result = await with_retries(lambda budget: run_attempt(probe, budget, scrub), timeout, retries, probe.settings.name)
    return replace(result, message=_bounded(result.message))


async def run_attempt(probe: Probe, timeout: float, scrub: Scrubber) -> Result:
    timer = PhaseTimer()
    started = perf_counter()
    try:
        async with asyncio.timeout(timeout):
            result = await probe.run(timer)
        if not isinstance(result, Result):
            result = Result.fail("internal", f"probe returned {type(result).__name__}, not a Result")
        elif undeclared := {label for gauge in result.gauges for label, _ in gauge.labels} - type(probe).figure_labels:
            # The config refuses static labels that collide with declared figure labels; an undeclared one could
            # collide unseen and break every scrape, so it is the probe's bug.
            result = Result.fail("internal", f"probe returned figures labelled {', '.join(sorted(undeclared))}, "
                                             "which its type does not declare in figure_labels")
    except TimeoutError:
        during = f" during {timer.current}" if timer.current else ""
        result = Result.fail("timeout", f"no answer within {format_duration(timeout)}{during}")
    except Exception as exc:  # noqa: BLE001 - a probe's bug must fail that probe alone
        log.debug("probe %s raised %s: %s", probe.settings.name, type(exc).__name__, printable(scrub(str(exc))))
        result = Result.fail("internal", f"probe raised {type(exc).__name__}: {exc}")
    duration = perf_counter() - started
    phases = dict(timer.phases)
    phases.update(result.phases)
    message = _bounded(printable(scrub(result.message)))
    checks = tuple(replace(check, text=printable(scrub(check.text))) for check in result.checks)
    return replace(result, duration_seconds=duration, phases=phases, message=message, checks=checks)


def _bounded(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_LENGTH else message[: MAX_MESSAGE_LENGTH - 1] + "…"
