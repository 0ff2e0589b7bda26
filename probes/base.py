"""What every probe type shares: the settings every probe has, and the one-method probe interface."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr

from canary.durations import parse_duration
from canary.phases import PhaseTimer
from canary.result import Result

# Label names the exporter sets itself; a user's static label may not take them.
RESERVED_LABELS = frozenset({"probe", "channel", "type", "severity", "phase", "result", "reason", "le", "quantile", "job", "instance"})
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key in labels:
        if not _LABEL_NAME.match(key) or key.startswith("__"):
            raise ValueError(f"label name {key!r} is not a valid Prometheus label name")
        if key in RESERVED_LABELS:
            raise ValueError(f"label name {key!r} is reserved (set by channel-canary itself)")
    return labels


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def _check_marker(header: str) -> str:
    if header and ":" not in header:
        raise ValueError('must look like "Header-Name: value", or be empty to send no marker')
    return header


def marker_headers(header: str) -> dict[str, str]:
    """The synthetic-traffic marker as a header dict (empty when the marker is switched off)."""
    name, _, value = header.partition(":")
    return {name.strip(): value.strip()} if header else {}


def _check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return pattern


Regex = Annotated[str, AfterValidator(_check_regex)]
"""A regular expression, compiled once at load so a typo is a config error, not a failed probe."""

Duration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
"""Seconds, written in config as a string such as "30s"."""

StaticLabels = Annotated[dict[str, str], AfterValidator(_check_labels)]

SyntheticHeader = Annotated[str, AfterValidator(_check_marker)]
"""Marks canary traffic as synthetic ("Header-Name: value"), so the platform can tell it apart and filter it."""


class ProbeSettings(BaseModel):
    """Settings every probe has; a probe type subclasses this with its own fields.

    `interval` and `timeout` are optional in the file and filled in from `[daemon]` at load, so after loading
    they are always set.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
    type: str
    channel: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    interval: Duration | None = None
    timeout: Duration | None = None
    labels: StaticLabels = Field(default_factory=dict)
    description: str = Field(default="", max_length=200)
    # "warning": a failure is shown and exported (with a `severity="warning"` label) but does not fail
    # `probe --once`; for parts a platform may run without by design (e.g. Kafka in its fallback mode).
    severity: Literal["critical", "warning"] = "critical"

    def target(self) -> str:
        """A short, secret-free description of what the probe talks to, for `probe list` and the status page."""
        return ""

    def secret_values(self) -> list[str]:
        """Every secret this probe's settings hold, so they can be scrubbed from all output."""
        return [value.get_secret_value() for value in _walk_secrets(self)]


def _walk_secrets(value: Any) -> list[SecretStr]:
    if isinstance(value, SecretStr):
        return [value]
    if isinstance(value, BaseModel):
        return [s for name in type(value).model_fields for s in _walk_secrets(getattr(value, name))]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _walk_secrets(item)]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _walk_secrets(item)]
    return []


S = TypeVar("S", bound=ProbeSettings)


class Probe(Generic[S]):
    """One probe type: built once from its settings, then asked to probe once per interval.

    `run` returns a Result for every expected failure (refused connection, bad status, failed check);
    an exception means a bug. The runner owns the timeout and the clock, so `run` need not time itself.
    """

    settings_model: ClassVar[type[ProbeSettings]]

    def __init__(self, settings: S) -> None:
        self.settings = settings

    async def run(self, timer: PhaseTimer) -> Result:
        raise NotImplementedError

    async def close(self) -> None:
        """Release anything held between runs (pools, sessions). Most probes hold nothing."""
