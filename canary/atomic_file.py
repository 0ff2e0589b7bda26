"""Writing a state file so that a crash at any moment leaves either the old file or the new one, never half of each.

The probe state and the uptime history are rewritten every minute; a daemon killed mid-write must still start from
a readable file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def write_atomically(path: Path, pieces: Iterable[str]) -> None:
    """Writes `pieces` one after another to a temporary neighbour of `path`, syncs it and renames it over `path`.
    Raises OSError (with the temporary file removed) when any step fails."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with temporary.open("w", encoding="utf-8") as file:
            for piece in pieces:
                file.write(piece)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
        raise


def os_reason(exc: BaseException) -> str:
    """A one-line reason for a failed file operation: the OS's own words when it gave any."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
