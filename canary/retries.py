"""Retries within a run's budget: a transient failure (`Result.transient`) is tried again, with exponential backoff
and jitter, while the probe's timeout lasts.

The budget is the whole run, backoff included: each attempt gets what is left of the timeout, and a wait that would
leave the next attempt less than a tenth of the timeout is not slept; the run stops there and reports its last
failure. So a run with retries ends within its timeout like one without (a probe that cleans up may outlast it by
its cleanup's bound, as ever). Each attempt is one whole `Probe.run`, so a probe that cleans up after a failure has
cleaned up before the next attempt starts. Nothing here knows a probe type: what is transient is the Result's to say.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from time import perf_counter
from typing import Awaitable, Callable

from tenacity import (
    AsyncRetrying, RetryCallState, retry_if_result, stop_after_attempt, stop_before_delay, wait_exponential, wait_random,
)

from canary.contract import Result, format_duration

log = logging.getLogger("canary.runner")

BACKOFF_FIRST = 0.25  # seconds before the second attempt (plus up to as much again of jitter), doubling after
BACKOFF_MAX = 4.0  # before jitter
MIN_ATTEMPT_SHARE = 0.1  # the least share of the timeout a next attempt must have left to be worth starting

Attempt = Callable[[float], Awaitable[Result]]
"""One attempt, given the seconds it may take."""


async def with_retries(attempt: Attempt, timeout: float, retries: int, name: str = "") -> Result:
    """The first result that is not transient, or the last one when the attempts or the budget ran out.

    The result carries `attempts` and the whole run's duration; its phases are the last attempt's. When it took
    more than one attempt, the message says which reasons the earlier ones failed with; when a transient failure
    was not tried again for want of time, it says so."""
    started = perf_counter()
    earlier: list[str] = []  # the reasons of the failed attempts before the latest
    backoff = wait_exponential(multiplier=BACKOFF_FIRST, max=BACKOFF_MAX) + wait_random(0, BACKOFF_FIRST)

    async def one() -> Result:
        return await attempt(max(timeout - (perf_counter() - started), 0.0))

    def wait(state: RetryCallState) -> float:
        asked = state.outcome.result().retry_after if state.outcome is not None else None
        return max(backoff(state), asked or 0.0)

    def before_sleep(state: RetryCallState) -> None:
        result: Result = state.outcome.result()  # type: ignore[union-attr]
        earlier.append(result.reason)
        log.debug("probe %s: attempt %d failed (%s), trying again in %s", name, state.attempt_number, result.reason,
                  format_duration(state.upcoming_sleep))

    def give_up(state: RetryCallState) -> Result:
        result: Result = state.outcome.result()  # type: ignore[union-attr]
        if state.attempt_number <= retries:  # attempts were left, time was not
            note = (f"; not tried again: the next attempt, {format_duration(state.upcoming_sleep)} away, would not fit "
                    f"the {format_duration(timeout)} timeout")
            return replace(result, message=result.message + note)
        return result

    retrying = AsyncRetrying(
        sleep=asyncio.sleep,
        retry=retry_if_result(lambda result: result.transient),
        stop=stop_after_attempt(retries + 1) | stop_before_delay(timeout * (1 - MIN_ATTEMPT_SHARE)),
        wait=wait,
        before_sleep=before_sleep,
        retry_error_callback=give_up,
    )
    result: Result = await retrying(one)
    attempts = len(earlier) + 1
    message = result.message
    if earlier:
        message += f" (attempt {attempts} of {retries + 1}; earlier: {', '.join(earlier)})"
    return replace(result, attempts=attempts, duration_seconds=perf_counter() - started, message=message)
