"""The plain data a probe hands back: what happened on one run, and nothing about how it is exported."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

# The closed vocabulary of failure reasons. It becomes a label value, so it must stay short and fixed:
# a probe that needs a new reason adds it here, with a line saying when it applies.
REASONS: dict[str, str] = {
    "ok": "the run passed",
    "timeout": "no complete answer within the probe's timeout",
    "dns": "the target's host name did not resolve",
    "connect": "no connection could be opened (refused, unreachable, reset)",
    "tls": "TLS handshake or certificate verification failed",
    "status": "the answer's status code was not one of the expected ones",
    "assertion": "the answer arrived but a configured check on its content failed",
    "body": "the answer's body could not be read or was larger than allowed",
    "redirect": "a redirect was refused (another host, too many, or redirects forbidden)",
    "auth": "credentials were refused",
    "query": "a database query failed",
    "threshold": "a measured figure crossed its configured limit",
    "expiry": "a credential, watch or certificate expires sooner than allowed",
    "invalid_grant": "an OAuth refresh token was revoked or expired (the provider answered invalid_grant)",
    "rate_limited": "the provider refused for rate limiting (429) or headroom fell below the configured floor",
    "model_missing": "the configured model is not served by the provider",
    "slow": "the answer came, but slower than the configured limit",
    "insecure": "the platform accepted a request it must refuse (e.g. a forged webhook signature)",
    "cleanup": "the checks passed but cleaning up the synthetic data failed",
    "internal": "the probe itself failed (a bug, or a result it could not produce)",
}

_GAUGE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True, slots=True)
class Gauge:
    """An extra figure a probe measured, exported as `canary_probe_<name>` with the probe's labels."""

    name: str
    value: float
    help: str
    labels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not _GAUGE_NAME.match(self.name):
            raise ValueError(f"gauge name {self.name!r} is not a valid metric name suffix")
        for label, _ in self.labels:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"gauge label {label!r} is not a valid label name")


@dataclass(frozen=True, slots=True)
class Check:
    """One evaluated condition, kept with its resolved text so a failure explains itself."""

    passed: bool
    text: str


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one run of one probe.

    `duration_seconds` is filled in by the runner, which owns the clock; a probe leaves it at 0.
    `channels` carries channel states a probe read from the platform (e.g. `/health`'s channel map),
    so `canary_channel_up` can show one channel down while the others stay up.
    """

    success: bool
    reason: str
    message: str = ""
    duration_seconds: float = 0.0
    phases: Mapping[str, float] = field(default_factory=dict)
    gauges: tuple[Gauge, ...] = ()
    checks: tuple[Check, ...] = ()
    channels: Mapping[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown reason {self.reason!r}")
        if self.success != (self.reason == "ok"):
            raise ValueError("a result succeeds exactly when its reason is 'ok'")

    @classmethod
    def ok(cls, message: str = "", **extra: object) -> "Result":
        return cls(True, "ok", message, **extra)  # type: ignore[arg-type]

    @classmethod
    def fail(cls, reason: str, message: str, **extra: object) -> "Result":
        return cls(False, reason, message, **extra)  # type: ignore[arg-type]
