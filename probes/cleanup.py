"""Cleanup that the runner's timeout, a reload or a daemon stop cannot cut off.

A probe that creates something on the platform (a ticket, a message) must remove it on every path: after a pass,
after a failure, and after its run was cancelled. The runner's `asyncio.timeout` cancels `run()`; a cleanup awaited
plainly would be cancelled with it and leave the synthetic data behind. So each cleanup runs as its own task,
awaited through `asyncio.shield` and kept referenced until it ends; the work itself must be bounded (the probes
bound it with their `cleanup_timeout`).

When the run is cancelled while the cleanup runs, the cancellation waits for the cleanup to end, then goes on: the
run ends late by at most that bound, so a run's upper bound is `timeout + cleanup_timeout`. A second cancellation
(a second SIGTERM) stops the waiting, not the cleanup, which ends in the background; `drain()` (from the probe's
`close()`) waits for those.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine, TypeVar

T = TypeVar("T")


class ShieldedCleanups:
    """A probe's cleanup tasks: shielded from the run's cancellation, referenced until they end."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self, work: Coroutine[Any, Any, T], if_interrupted: Callable[[T], None] | None = None) -> T:
        """Run `work` (which must bound itself) to its end, even when the caller is cancelled meanwhile.

        `if_interrupted` gets the outcome the caller, cancelled, can no longer return (to log it)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # Cancelled while cleaning up: finish the cleanup first, then let the cancellation through.
            await asyncio.wait([task])
            if if_interrupted is not None and not task.cancelled() and task.exception() is None:
                if_interrupted(task.result())
            raise

    async def drain(self) -> None:
        """Wait for cleanups a second cancellation left running in the background."""
        if self._tasks:
            await asyncio.wait(set(self._tasks))
