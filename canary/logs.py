"""Log formats of `probe run --log.format`: text (a sentence per line), logfmt and json (one record per line).

A probe event (failure, recovery) carries the fields in EVENT_FIELDS as attributes of its record (`extra=`);
logfmt and json render them as fields, text keeps its sentence. The ScrubbingFilter runs before any formatter,
and scrubs those fields as well as the message.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

FORMATS = ("text", "logfmt", "json")
LEVELS = ("debug", "info", "warning", "error")
# The fields a probe event carries (`log.warning(..., extra=event_fields(...))`), in the order they are rendered.
EVENT_FIELDS = ("probe", "channel", "type", "severity", "reason", "duration_seconds")


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> list[tuple[str, Any]]:
    fields: list[tuple[str, Any]] = [
        ("time", _timestamp(record)), ("level", record.levelname.lower()), ("logger", record.name), ("msg", record.getMessage()),
    ]
    fields += [(name, getattr(record, name)) for name in EVENT_FIELDS if hasattr(record, name)]
    return fields


def _logfmt_value(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    if text and not any(c in text for c in ' ="\\') and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)  # quoted, with \n, \" and \\ escaped


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in _fields(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(dict(_fields(record)), ensure_ascii=False)


def formatter(name: str) -> logging.Formatter:
    if name == "logfmt":
        return LogfmtFormatter()
    if name == "json":
        return JsonFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
