"""What probes learnt between runs (a watch's expiry, a back-off, a sliding window), kept across reloads and restarts.

A reload rebuilds every probe whose settings changed at all, and a restart rebuilds them all; without this, a Gmail
probe would renew a watch that has days left, an LLM probe would call a provider that asked it to wait, and a Kafka
lag probe would start its windows empty. The probes own their state through three hooks of `Probe` (`state_key`,
`export_state`, `restore_state`); this module only moves it around and never looks inside:

- on a reload, `hand_over` gives a replaced probe's state to its replacement when name, type and state key match;
- across a restart, `ProbeStateBook` saves every running probe's state to `<state_dir>/probe-state.json` (every
  minute when it changed, and at stop; encoded and written in a worker thread, to a temporary file renamed over the
  old one), and restores it into the probes the first config load builds, before their first run.

State keys are stored as SHA-256 digests, so nothing a key is made of reaches the file. A file that cannot be read,
is not JSON or not ours, or holds state a probe refuses, is ignored with one warning naming it: it never stops the
daemon or a probe.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import ValidationError

from canary.atomic_file import os_reason, write_atomically
from canary.contract import Probe, ProbeSettings

log = logging.getLogger("canary.probe_state")

FILE_NAME = "probe-state.json"
FORMAT = "channel-canary/probe-state"
FORMAT_VERSION = 1
SAVE_EVERY = 60.0
MAX_FILE_BYTES = 64 * 1024 * 1024  # far above what 10,000 probes write; a bigger file is not ours
_SHOWN_REJECTIONS = 3

ProbeList = Iterable[tuple[ProbeSettings, Probe]]


@dataclass(frozen=True, slots=True)
class _Saved:
    """One probe's entry in the file."""

    type: str
    key: str
    state: dict[str, Any]


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def why(exc: BaseException) -> str:
    """A one-line reason: pydantic's first errors with their paths, else the exception's own text."""
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'state'}: {error['msg']}" for error in exc.errors()[:2]
        )
    return os_reason(exc)


def export(settings: ProbeSettings, probe: Probe) -> _Saved | None:
    """The probe's state with its identity, or None when it has none. A broken hook raises."""
    key = probe.state_key()
    if key is None:
        return None
    state = probe.export_state()
    if not isinstance(state, dict):
        raise TypeError(f"export_state() returned {type(state).__name__}, not a dict")
    return _Saved(settings.type, key_digest(key), state) if state else None


def _restore(saved: _Saved, settings: ProbeSettings, probe: Probe) -> bool:
    """Give `saved` to `probe` if it is about the same thing (True); False when it is not its state. A probe that
    refuses the state raises."""
    key = probe.state_key()
    if key is None or saved.type != settings.type or saved.key != key_digest(key):
        return False
    probe.restore_state(saved.state)
    return True


def hand_over(old_settings: ProbeSettings, old_probe: Probe, settings: ProbeSettings, probe: Probe) -> None:
    """On a reload: give the replaced probe's state to its replacement, when name, type and state key match."""
    if old_settings.name != settings.name:
        return
    try:
        saved = export(old_settings, old_probe)
        if saved is not None and _restore(saved, settings, probe):
            log.debug("probe %s keeps its state across the reload", settings.name)
    except Exception as exc:  # noqa: BLE001 - the new probe then starts afresh, as it did before this existed
        log.warning("probe %s: its state could not be carried over the reload (%s); it starts afresh", settings.name, why(exc))


class ProbeStateBook:
    """The probes' saved state; `path` is the file, or None to keep nothing across restarts."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._saved: dict[str, _Saved] = {}  # read at start, until the first config load has taken its share
        self._rejected: list[str] = []
        self._last_written: dict[str, Any] | None = None
        self._save_failed: str | None = None
        self._broken: set[str] = set()  # probes whose broken state was reported
        self._writing = threading.Lock()  # the save at stop waits for a periodic one still writing in its thread

    @classmethod
    def in_directory(cls, state_dir: str | os.PathLike[str] | None) -> "ProbeStateBook":
        return cls(None if state_dir is None else Path(state_dir) / FILE_NAME)

    # -- at start ----------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the saved state, if any. Anything wrong with the file is one warning naming it, never raised."""
        if self.path is None:
            return
        try:
            if self.path.stat().st_size > MAX_FILE_BYTES:
                raise ValueError(f"larger than {MAX_FILE_BYTES // 1048576} MiB")
            text = self.path.read_text(encoding="utf-8")
            self._saved = _parse(text)
        except FileNotFoundError:
            log.info("no saved probe state at %s yet; every probe starts afresh", self.path)
            return
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            log.warning("ignoring the saved probe state %s: %s; every probe starts afresh (the next save replaces it)",
                        self.path, why(exc))
            return
        log.info("loaded the saved state of %d probes from %s", len(self._saved), self.path)

    def restored(self, settings: ProbeSettings, probe: Probe) -> Probe:
        """Give a freshly built probe what was saved for it (only until `started`); returns the probe."""
        saved = self._saved.pop(settings.name, None)
        if saved is not None:
            try:
                _restore(saved, settings, probe)
            except Exception as exc:  # noqa: BLE001 - a hostile or corrupt entry must never stop a probe
                self._rejected.append(f"{settings.name[:64]} ({why(exc)[:200]})")
        return probe

    def started(self) -> None:
        """The first config load is done: report what was refused, once, and forget the rest."""
        if self._rejected:
            shown = "; ".join(self._rejected[:_SHOWN_REJECTIONS])
            more = len(self._rejected) - _SHOWN_REJECTIONS
            log.warning("ignoring part of the saved probe state %s: %s%s; those probes start afresh",
                        self.path, shown, f" and {more} more" if more > 0 else "")
        self._saved.clear()
        self._rejected.clear()

    # -- saving ------------------------------------------------------------------------------------------------

    def snapshot(self, probes: ProbeList) -> dict[str, Any]:
        """Every probe's state, taken on the event loop (the probes live there); cheap: no encoding."""
        entries: dict[str, Any] = {}
        for settings, probe in probes:
            try:
                saved = export(settings, probe)
            except Exception as exc:  # noqa: BLE001 - one probe's broken hook must not stop the others being saved
                self._warn_once(settings.name, f"its state could not be exported ({type(exc).__name__}: {exc})")
                continue
            if saved is not None:
                entries[settings.name] = {"type": saved.type, "key": saved.key, "state": saved.state}
        return entries

    def save(self, probes: ProbeList) -> bool:
        """Write the probes' state now (at stop); returns whether it worked. Failures are logged, never raised."""
        if self.path is None:
            return False
        return self._write(self.snapshot(probes))

    async def save_every(self, probes: Callable[[], ProbeList], seconds: float = SAVE_EVERY) -> None:
        """Save whenever a probe's state changed, every `seconds`, until cancelled; written in a worker thread."""
        if self.path is None:
            return
        while True:
            await asyncio.sleep(seconds)
            try:
                entries = self.snapshot(probes())
                if entries != self._last_written:
                    await asyncio.to_thread(self._write, entries)
            except Exception:  # a bug here must not end the saving for the rest of the daemon's life
                log.exception("saving the probe state failed")

    def _write(self, entries: dict[str, Any]) -> bool:
        with self._writing:
            text = self._encode(entries)
            if not self._write_file(text):
                return False
            self._last_written = entries
            return True

    def _encode(self, entries: dict[str, Any]) -> str:
        """The file's text; a probe whose state is not plain JSON is left out (and named once), not the whole file."""
        plain = {}
        for name, entry in entries.items():
            try:
                json.dumps(entry, allow_nan=False)
            except (TypeError, ValueError, RecursionError) as exc:
                self._warn_once(name, f"its state is not plain JSON ({exc})")
                continue
            plain[name] = entry
        document = {"format": FORMAT, "version": FORMAT_VERSION, "saved_at": round(time.time(), 3), "probes": plain}
        return json.dumps(document, separators=(",", ":"))

    def _warn_once(self, name: str, problem: str) -> None:
        if name not in self._broken:
            self._broken.add(name)
            log.warning("probe %s: %s; it is not saved", name, problem)

    def _write_file(self, text: str) -> bool:
        assert self.path is not None
        try:
            write_atomically(self.path, (text,))
        except OSError as exc:
            if why(exc) != self._save_failed:
                log.warning("cannot save the probe state to %s (%s); it is retried", self.path, why(exc))
            self._save_failed = why(exc)
            return False
        if self._save_failed is not None:
            log.info("probe state saved to %s again", self.path)
            self._save_failed = None
        return True


def _parse(text: str) -> dict[str, _Saved]:
    """Every probe's entry of a saved file; ValueError saying what is wrong with anything else."""
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f'not a channel-canary probe state file (no "format": "{FORMAT}")')
    if document.get("version") != FORMAT_VERSION:
        raise ValueError(f"written in another layout (version {document.get('version')!r}; this daemon reads {FORMAT_VERSION})")
    probes = document.get("probes")
    if not isinstance(probes, dict):
        raise ValueError('"probes" is not an object')
    parsed: dict[str, _Saved] = {}
    for name, entry in probes.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("type"), str) and isinstance(entry.get("key"), str)
                and isinstance(entry.get("state"), dict)):
            raise ValueError(f'probe {name[:64]!r}: not an object with "type", "key" and "state"')
        if entry["state"]:
            parsed[name] = _Saved(entry["type"], entry["key"], entry["state"])
    return parsed
