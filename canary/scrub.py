"""Keeps secrets out of logs: a logging filter that renders each record once and scrubs it.

The scrubber itself lives in `canary.contract`, because probes scrub what they quote from a target too.
"""

from __future__ import annotations

import logging

from canary.contract import Scrubber
from canary.logs import EVENT_FIELDS

__all__ = ["Scrubber", "ScrubbingFilter"]


class ScrubbingFilter(logging.Filter):
    """A logging filter that renders each record's message once and scrubs it, and a probe event's fields."""

    def __init__(self, scrubber: Scrubber) -> None:
        super().__init__()
        self.scrubber = scrubber

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.scrubber(record.getMessage())
        record.args = None
        for name in EVENT_FIELDS:  # a probe event's structured fields, rendered by the logfmt and json formats
            value = getattr(record, name, None)
            if isinstance(value, str):
                setattr(record, name, self.scrubber(value))
        if record.exc_info and record.exc_info[1] is not None:
            # Tracebacks can quote DSNs; keep the type and a scrubbed message only.
            exc = record.exc_info[1]
            record.msg += f" ({type(exc).__name__}: {self.scrubber(str(exc))})"
            record.exc_info = None
            record.exc_text = None
        return True
