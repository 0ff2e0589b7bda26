"""The contract between the core and the probe types: the one module `canary/` and `probes/` both import.

It holds what a probe is given (its settings and a phase timer), what it hands back (a `Result`), and the
field types every probe's settings share (durations, regexes, labels, the synthetic-traffic marker, host:port).
It imports nothing else of ours, so a probe module never reaches into the core and the core never into a probe.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from time import perf_counter
from typing import Annotated, Any, ClassVar, Generic, Iterable, Iterator, Literal, Mapping, Protocol, TypeVar
from urllib.parse import urlsplit

import regex
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr

try:
    VERSION = version("channel-canary")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.0.0+source"
USER_AGENT = f"channel-canary/{VERSION}"

# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------

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
    # Not a failure: the scheduler gives it to a run that timed out (or was too slow) while the canary's own event
    # loop was saturated. It counts in no probe's runs or failures and leaves the probe's verdict as it was.
    "starved": "no verdict: the canary itself was too busy to finish the run in time (its event loop was behind)",
}
# Reasons any probe can end with, whatever its type: the runner produces these itself.
RUNNER_REASONS = ("timeout", "internal")
# Failures another attempt may well not see (a probe with `retries` tries again within its timeout). A probe marks a
# failure of another reason as transient by setting `Result.retry_after` (an HTTP 5xx, a 429). Failures of the
# reasons in NEVER_RETRIED are never tried again, whatever the probe says: another attempt cannot change refused
# credentials, a failed check or a hole, a failed cleanup would leave more behind, and a bug stays a bug.
TRANSIENT_REASONS = frozenset({"connect", "timeout"})
NEVER_RETRIED = frozenset({"auth", "invalid_grant", "assertion", "insecure", "cleanup", "internal"})
MAX_RETRIES = 5

_METRIC_SUFFIX = re.compile(r"^[a-z][a-z0-9_]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True, slots=True)
class Gauge:
    """An extra figure a probe measured, exported as `canary_probe_<name>` with the probe's labels.

    Most are gauges. A figure that is a counter where it is read (a server-lifetime count such as Redis's
    rejected connections) says `kind="counter"`, and is exported typed as one, as `canary_probe_<name>_total`, so
    `rate()` and `increase()` are right about it, resets included."""

    name: str
    value: float
    help: str
    labels: tuple[tuple[str, str], ...] = ()
    kind: Literal["gauge", "counter"] = "gauge"

    def __post_init__(self) -> None:
        if not _METRIC_SUFFIX.match(self.name):
            raise ValueError(f"gauge name {self.name!r} is not a valid metric name suffix")
        if self.kind not in ("gauge", "counter"):
            raise ValueError(f"figure kind {self.kind!r} is neither 'gauge' nor 'counter'")
        if self.kind == "counter" and self.name.endswith("_total"):
            raise ValueError(f"counter name {self.name!r} must not end in _total (the exporter adds it)")
        for label, _ in self.labels:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"gauge label {label!r} is not a valid label name")

    @property
    def family(self) -> str:
        """The metric name as exported."""
        suffix = "_total" if self.kind == "counter" else ""
        return f"canary_probe_{self.name}{suffix}"


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
    `retry_after` marks a failure as transient beyond TRANSIENT_REASONS: the least wait, in seconds, before another
    attempt (0: the usual backoff); None leaves it to the reason. `attempts` is the runner's to fill in.
    """

    success: bool
    reason: str
    message: str = ""
    duration_seconds: float = 0.0
    phases: Mapping[str, float] = field(default_factory=dict)
    gauges: tuple[Gauge, ...] = ()
    checks: tuple[Check, ...] = ()
    channels: Mapping[str, bool] = field(default_factory=dict)
    retry_after: float | None = None
    attempts: int = 1

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown reason {self.reason!r}")
        if self.success != (self.reason == "ok"):
            raise ValueError("a result succeeds exactly when its reason is 'ok'")
        if self.retry_after is not None and not self.retry_after >= 0:
            raise ValueError(f"retry_after must be a number of seconds >= 0, got {self.retry_after!r}")

    @property
    def transient(self) -> bool:
        """Whether another attempt might pass where this one failed."""
        if self.success or self.reason in NEVER_RETRIED:
            return False
        return self.reason in TRANSIENT_REASONS or self.retry_after is not None

    @classmethod
    def ok(cls, message: str = "", **extra: Any) -> "Result":
        return cls(True, "ok", message, **extra)

    @classmethod
    def fail(cls, reason: str, message: str, **extra: Any) -> "Result":
        return cls(False, reason, message, **extra)


class PhaseTimer:
    """Collects how long each named phase of a run took.

    The runner creates one per run and keeps a reference, so when a run times out it can still say which
    phase was in progress and report the phases that did finish.
    """

    __slots__ = ("phases", "current", "_started")

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.current: str | None = None
        self._started = 0.0

    def begin(self, name: str) -> None:
        self.current = name
        self._started = perf_counter()

    def end(self, name: str) -> None:
        if self.current == name:
            self.record(name, perf_counter() - self._started)
            self.current = None

    def record(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + max(seconds, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        except BaseException:
            # The run ended inside this phase (timeout, cancel, error): keep it as `current` so the
            # runner can say where, and still count the time spent in it.
            self.record(name, perf_counter() - self._started)
            raise
        self.end(name)


# ---------------------------------------------------------------------------------------------------------------
# Durations, secrets, host:port
# ---------------------------------------------------------------------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: object) -> float:
    """Parse a Go-style duration string ("30s", "2m", "1h30m", "250ms") into seconds.

    Only strings: a bare number is refused rather than guessed to be seconds or milliseconds."""
    if not isinstance(text, str):
        raise ValueError(f"expected a duration string such as \"30s\" or \"2m\", got {type(text).__name__}")
    cleaned = text.strip()
    if not cleaned:
        raise ValueError("expected a duration such as \"30s\" or \"2m\", got an empty string")
    position, total = 0, 0.0
    for match in _PART.finditer(cleaned):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(cleaned):
        raise ValueError(f"{text!r} is not a duration (use a number and a unit: ms, s, m, h, d, e.g. \"30s\")")
    return total


def format_duration(seconds: float) -> str:
    """The shortest readable form, for messages and the status page."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:g}s"
    if seconds < 7200:
        return f"{seconds / 60:g}m"
    return f"{seconds / 3600:g}h"


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
SECRET_NAME = re.compile(r"auth|token|key|secret|cookie|signature|sig$|session|password|passwd|pwd|credential", re.IGNORECASE)
"""Header and query-parameter names whose values are secrets."""


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


# Characters that must not reach a terminal, a log line, a JUnit report or a page as they are: C0 and C1 controls (ANSI
# escapes, NUL, a CR/LF that would forge a log line), Unicode line separators, bidirectional overrides that reorder
# what is shown, and lone surrogates (text decoded with surrogateescape), which no UTF-8 writer accepts.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: str) -> str:
    """`text` with every character that could steer a terminal or forge a log line shown as an escape (`\\x1b`,
    `\\n`, `\\u202e`), everything else kept. Messages quote what targets sent (a status line's reason, a reply, a
    provider's error); the runner passes every message and check text through this before anything shows it."""
    if text.isprintable():
        return text
    return _UNPRINTABLE.sub(_escape, text)


_HOST_PORT = re.compile(r"^(?:\[(?P<ipv6>[0-9a-fA-F:.]+)\]|(?P<host>[A-Za-z0-9._-]*)):(?P<port>\d{1,5})$")


def parse_host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPV6]:PORT` as (host, port). The host is never empty: ":9465" would silently bind every
    interface, so that must be written out (`0.0.0.0:9465`, `[::]:9465`)."""
    match = _HOST_PORT.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"must be HOST:PORT (e.g. 127.0.0.1:9465 or [::1]:9465), got {str(text)[:80]!r}")
    port = int(match.group("port"))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not between 1 and 65535")
    host = match.group("ipv6") or match.group("host") or ""
    if not host:
        raise ValueError(f"the host is empty in {text.strip()!r}: write 0.0.0.0:{port} to listen on every interface")
    return host, port


# ---------------------------------------------------------------------------------------------------------------
# Settings every probe shares, and the probe interface
# ---------------------------------------------------------------------------------------------------------------

# Label names the exporter sets itself; a user's static label may not take them.
RESERVED_LABELS = frozenset(
    {"probe", "channel", "type", "importance", "severity", "phase", "result", "reason", "le", "quantile", "job", "instance"}
)


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key in labels:
        if not _LABEL_NAME.match(key) or key.startswith("__"):
            raise ValueError(f"label name {key!r} is not a valid Prometheus label name")
        if key in RESERVED_LABELS:
            raise ValueError(f"label name {key!r} is reserved (set by channel-canary itself)")
    return labels


MAX_DURATION = 366 * 86400.0


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    if seconds > MAX_DURATION:  # also keeps the event loop's timers away from float overflow
        raise ValueError(f"must be at most 366d, got {format_duration(seconds)}")
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
        regex.compile(pattern)
    except regex.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return pattern


def _check_host_port(text: str) -> str:
    parse_host_port(text)
    return text


def spelled(pattern: str, words: str) -> Any:
    """A string checked against `pattern`, whose error says in `words` what it must be (never the regex itself)."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"must be {words}, got {value[:80]!r}")
        return value

    return Annotated[str, AfterValidator(check)]


ProbeName = spelled(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", "1 to 64 letters, digits, '_', '.', ':' or '-', starting with a letter or digit")
LowerName = spelled(r"[a-z][a-z0-9_]{0,31}", "1 to 32 lower-case letters, digits or '_', starting with a letter (e.g. web_form)")
"""A channel, step or query name: it becomes a label value or a phase, so it stays short and tidy."""

Regex = Annotated[str, AfterValidator(_check_regex)]
"""A regular expression, compiled once at load so a typo is a config error, not a failed probe. Probes compile and
search it with `probes.patterns`, never with `re` (see there why)."""

Duration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
"""Seconds, written in config as a string such as "30s"."""

StaticLabels = Annotated[dict[str, str], AfterValidator(_check_labels)]

SyntheticHeader = Annotated[str, AfterValidator(_check_marker)]
"""Marks canary traffic as synthetic ("Header-Name: value"), so the platform can tell it apart and filter it."""

HostPort = Annotated[str, AfterValidator(_check_host_port)]
"""`HOST:PORT`, checked by the one parser every address goes through."""


def _check_link(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise ValueError(f"must be an http:// or https:// URL, got {url[:80]!r}")
    return url


Link = Annotated[str, AfterValidator(_check_link)]
"""An http(s) URL that is only shown (a runbook), never fetched."""


class HoldsSecrets:
    """A settings value that carries secrets inside it (a URL's password, a secret query value)."""

    def secret_parts(self) -> list[str]:
        raise NotImplementedError


class ProbeSettings(BaseModel):
    """Settings every probe has; a probe type subclasses this with its own fields.

    `interval`, `timeout` and `retries` are optional in the file and filled in from `[daemon]` at load, so after
    loading they are always set.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    name: ProbeName
    type: str
    channel: LowerName
    interval: Duration | None = None
    timeout: Duration | None = None
    # Further attempts after a transient failure, all within `timeout` (canary/retries.py); from [daemon] if unset.
    retries: int | None = Field(default=None, ge=0, le=MAX_RETRIES)
    labels: StaticLabels = Field(default_factory=dict)
    description: str = Field(default="", max_length=200)
    # Where an operator reads what to do when this probe fails; shown as a link on the status page.
    runbook_url: Link | None = Field(default=None, max_length=500)
    # "warning": a failure is shown and exported (with a `severity="warning"` label) but does not fail
    # `probe --once`; for parts a platform may run without by design (e.g. Kafka in its fallback mode).
    severity: Literal["critical", "warning"] = "critical"

    def target(self) -> str:
        """A short, secret-free description of what the probe talks to, for `probe list` and the status page."""
        return ""

    def check_timing(self, timeout: float, inherited_from: str | None) -> str | None:
        """Why this probe cannot work under `timeout`, its effective timeout, or None.

        Called at load once `timeout` is known (the probe's own, or `inherited_from` the named default), because
        a limit such as an LLM's `slow_after` must stay below it. The answer is `KEY: problem`, naming the key
        to change; the loader prefixes the probe's path."""
        return None

    def secret_values(self) -> list[str]:
        """Every secret this probe's settings hold, so they can be scrubbed from all output."""
        return _walk_secrets(self)

    def cleanup_bound(self) -> float:
        """How long a run may go on after it was cancelled, to clean up what it created (0: it stops at once).
        A stop waits this long, on top of its own bound, before it gives up on the run."""
        return 0.0

    def safe_target(self) -> str:
        """`target()` with every secret of these settings masked: what every page and listing shows."""
        return Scrubber(self.secret_values())(self.target())

    def leaves_objects(self) -> bool:
        """Whether runs create objects on the platform that a cleanup removes (a synthetic ticket). Such a probe
        records them in the object ledger, so a killed process's leftovers are removed later (canary/ledger.py)."""
        return False

    def sweep_interval(self) -> float | None:
        """How often to look on the platform for this probe's synthetic objects that no ledger knows of (a process
        killed between a create and its answer), through `Probe.find_leftovers`; None: never."""
        return None


def _walk_secrets(value: Any) -> list[str]:
    if isinstance(value, SecretStr):
        return [value.get_secret_value()]
    if isinstance(value, HoldsSecrets):
        return value.secret_parts()
    if isinstance(value, BaseModel):
        return [s for name in type(value).model_fields for s in _walk_secrets(getattr(value, name))]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _walk_secrets(item)]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _walk_secrets(item)]
    return []


class ObjectLedger(Protocol):
    """A probe's part of the durable ledger of what its runs created on the platform (canary/ledger.py)."""

    async def record(self, run_id: str, variables: Mapping[str, str]) -> None:
        """Run `run_id` created something: keep the values its cleanup needs (never a secret). On disk when this
        returns, so a `kill -9` right after leaves the entry behind to be cleaned up later."""

    async def settle(self, run_id: str, removed: bool) -> None:
        """The run is over: what it created was removed (the entry goes), or was not (it stays, a leftover)."""


class _NoLedger:
    async def record(self, run_id: str, variables: Mapping[str, str]) -> None:
        return None

    async def settle(self, run_id: str, removed: bool) -> None:
        return None


NO_LEDGER: ObjectLedger = _NoLedger()

S = TypeVar("S", bound=ProbeSettings)


class Probe(Generic[S]):
    """One probe type: built once from its settings, then asked to probe once per interval.

    `run` returns a Result for every expected failure (refused connection, bad status, failed check);
    an exception means a bug. The runner owns the timeout and the clock, so `run` need not time itself.

    `reasons` lists the failure reasons this type can return (the runner adds `timeout` and `internal`), so the
    exporter can show each failure counter at 0 before the first failure. `figure_labels` lists the label names
    its gauges use, so a static label of the same name is refused at load instead of breaking every scrape.
    `libraries` names the modules `run` imports locally (client libraries too heavy to import at start-up); the
    runner imports them off the event loop before the first run (see canary/libraries.py).
    """

    settings_model: ClassVar[type[ProbeSettings]]
    reasons: ClassVar[tuple[str, ...]] = ()
    figure_labels: ClassVar[frozenset[str]] = frozenset()
    libraries: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: S) -> None:
        self.settings = settings

    async def run(self, timer: PhaseTimer) -> Result:
        raise NotImplementedError

    async def close(self) -> None:
        """Release anything held between runs (pools, sessions). Most probes hold nothing."""

    # A probe that learns something worth keeping across runs (a watch's expiry, a back-off, a sliding window) can
    # keep it across a reload that rebuilds it and across a restart. The core never reads the state: it asks for it,
    # stores it, and hands it back to a probe of the same name, type and `state_key()`.

    def state_key(self) -> str | None:
        """What this probe's state is about (the account, cluster or endpoint it describes), or None: no state.

        State is handed on only when name, type and this key are unchanged, so an interval or timeout change keeps
        it and another account or cluster starts afresh. It is compared and stored only as a digest, but must still
        be worth nothing to an attacker: no secrets."""
        return None

    def export_state(self) -> dict[str, Any]:
        """The state worth keeping, as a fresh structure of plain JSON values ({} for none).

        Times are wall-clock Unix seconds (`time.time()`), never loop or monotonic time, which mean nothing after a
        restart. Never a secret: the result is written to the state directory. It may be encoded in another thread,
        so it must share no mutable object with the probe."""
        return {}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Take over a predecessor's `export_state()`, or what a previous process saved, before the first run.

        The data may come from a corrupt or hostile file: validate all of it, and raise ValueError (naming what is
        wrong) rather than keep anything doubtful. Called only with a non-empty state."""

    # Set by whoever runs the probe (the daemon, `--once`) before its first run; a probe whose settings
    # `leaves_objects()` records there what each run creates.
    ledger: ObjectLedger = NO_LEDGER

    async def remove_leftover(self, variables: Mapping[str, str]) -> str | None:
        """Remove an object an earlier run left behind (perhaps of a killed process), from the values it recorded,
        with this (current) config's requests. None once it is gone (the platform answered 2xx or 404), else why
        not. Bounded in time by the probe (its cleanup timeout)."""
        return f"the {self.settings.type} probe type creates nothing it could remove"

    async def find_leftovers(self, now: float) -> tuple[list[dict[str, str]], str | None]:
        """The sweep: this probe's synthetic objects listed by the platform and old enough (at Unix time `now`) that
        no run in flight can own them, each as the values `remove_leftover` takes; and what went wrong, if anything."""
        return [], None
