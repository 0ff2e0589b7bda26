"""Searching what a target sent with a configured regular expression, without ever holding the event loop.

Patterns are compiled with the `regex` module (the syntax and meaning of `re`), not `re`: a pattern such as `(a+)+$`
backtracks for ages on 100 KB of "a" followed by "b", and `re` can neither stop a search nor release the GIL during
one, so a thread does not help either. `regex` searches take a timeout and, with `concurrent=True`, run without the
GIL. Searches that do not end at once run on a small pool of their own, so a target feeding runaway texts can use up
those threads only, never the default executor that DNS lookups and the Gmail token refresh need.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import regex

from canary.contract import format_duration

SEARCH_THREADS = 2

REGEX_INLINE_SECONDS = 0.01
"""How long a search may hold the event loop before `search` moves it to a worker thread."""
_MIN_SEARCH_SECONDS = 0.001  # `regex` reads a timeout of 0 as "give up at once"; every search gets a moment


class RegexTimeout(Exception):
    """A configured regular expression gave up on a text: it backtracks too much on it (or the text is huge)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = round(seconds, 3)
        super().__init__(f"gave up after {format_duration(self.seconds)}")


def compile_regex(pattern: str | bytes) -> regex.Pattern:
    """A configured pattern, compiled with the `regex` module (see the module docstring)."""
    return regex.compile(pattern)


def search_now(pattern: regex.Pattern, text: str | bytes, seconds: float) -> regex.Match | None:
    """`pattern.search(text)` on this thread, giving up (RegexTimeout) after `seconds`. For callers that cannot await:
    the loop is held for at most `seconds`, so keep it short."""
    seconds = max(seconds, _MIN_SEARCH_SECONDS)
    try:
        return pattern.search(text, timeout=seconds)
    except TimeoutError:
        raise RegexTimeout(seconds) from None


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def search(pattern: regex.Pattern, text: str | bytes, seconds: float) -> regex.Match | None:
    """`pattern.search(text)` without holding the event loop, giving up (RegexTimeout) after `seconds` in all.

    Nearly every search ends within REGEX_INLINE_SECONDS, inline. One that does not starts again in a worker thread,
    without the GIL, bounded by what is left of `seconds`: a runaway pattern costs that thread, never the loop. The
    wait is bounded here too, because without the GIL `regex` notices its timeout late (measured: up to 1.2 s after
    a 2 s limit); the thread ends on its own soon after, also when the caller was cancelled meanwhile."""
    seconds = max(seconds, _MIN_SEARCH_SECONDS)
    inline = min(seconds, REGEX_INLINE_SECONDS)
    try:
        return pattern.search(text, timeout=inline)
    except TimeoutError:
        if seconds <= inline:
            raise RegexTimeout(seconds) from None
    left = seconds - inline
    searching = asyncio.get_running_loop().run_in_executor(
        _search_pool(), functools.partial(pattern.search, text, concurrent=True, timeout=left))
    searching.add_done_callback(_retrieved)  # a search given up on ends later with TimeoutError, which nobody awaits
    try:
        async with asyncio.timeout(left):
            return await asyncio.shield(searching)  # shielded: a search in a thread cannot be cancelled, only left
    except TimeoutError:  # ours, or the search's own
        raise RegexTimeout(seconds) from None


@functools.cache
def _search_pool() -> ThreadPoolExecutor:
    """The threads slow searches run on: made on first need, once per process (every search is bounded, so its
    threads never stay busy for longer than the slowest probe's timeout)."""
    return ThreadPoolExecutor(max_workers=SEARCH_THREADS, thread_name_prefix="regex-search")
