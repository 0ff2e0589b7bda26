"""Keeps secrets out of everything a person or a scraper can read: logs, messages, errors, pages."""

from __future__ import annotations

import logging
import re
from typing import Iterable

MASK = "***"
# user:password@ in any URL or DSN, even ones we were never told about.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*):[^@\s/]*@")
# key=value / key: value pairs whose key names a secret (query strings, DSN parameters, headers); not config
# key paths such as `probes[0].api_key: must be …`, whose words after the colon are an error, not a value.
_SECRET_PAIR = re.compile(
    r"(?<![\w.])(?P<key>(?:password|passwd|pwd|secret|token|api[_-]?key|authorization|auth_token|access_token|refresh_token)"
    r"[\"']?\s*[=:]\s*[\"']?)(?P<value>(?:Bearer\s+|Basic\s+)?[^\s&\"',;}]+)",
    re.IGNORECASE,
)
_MIN_SECRET_LENGTH = 4


class Scrubber:
    """Replaces known secret values and anything shaped like a credential with `***`."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        known = {s for s in secrets if s and len(s) >= _MIN_SECRET_LENGTH}
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted(known, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
        return _SECRET_PAIR.sub(lambda m: f"{m.group('key')}{MASK}", text)


class ScrubbingFilter(logging.Filter):
    """A logging filter that renders each record's message once and scrubs it."""

    def __init__(self, scrubber: Scrubber) -> None:
        super().__init__()
        self.scrubber = scrubber

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.scrubber(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            # Tracebacks can quote DSNs; keep the type and a scrubbed message only.
            exc = record.exc_info[1]
            record.msg += f" ({type(exc).__name__}: {self.scrubber(str(exc))})"
            record.exc_info = None
            record.exc_text = None
        return True
