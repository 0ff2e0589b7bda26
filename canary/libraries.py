"""The heavy libraries of probe types (aiokafka, asyncpg, google-auth, redis, twilio…), imported when needed and
never on the event loop.

Importing every type's libraries took ~430 ms of each start. A probe type names what it imports at run time in
`Probe.libraries` and imports it inside the functions that use it, so loading a config (and `check-config`) costs
only the settings models. The runner awaits `import_off_loop` before a probe's run, which is free once the modules
are imported and otherwise imports them in a worker thread; the daemon starts that for every configured type as
soon as it is listening, so the first runs rarely wait. The imports are made one at a time (a lock): two threads
importing libraries that import each other could otherwise each get a module the other had only half imported.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from typing import Iterable

# Names whose import has finished. sys.modules alone cannot tell: it holds a module while it is still being imported.
_imported: set[str] = set()
_importing = threading.Lock()


def import_now(names: Iterable[str]) -> None:
    """Import `names` in this thread (a worker thread: this blocks for as long as the imports take)."""
    with _importing:
        for name in names:
            if name not in _imported:
                importlib.import_module(name)
                _imported.add(name)


async def import_off_loop(names: Iterable[str]) -> None:
    """Return once every module of `names` is imported; the loop goes on while a worker thread imports them."""
    missing = [name for name in names if name not in _imported]
    if missing:
        await asyncio.to_thread(import_now, missing)
