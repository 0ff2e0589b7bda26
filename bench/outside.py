"""A real `probe run` measured from outside, as a user runs it and as Prometheus sees it.

`RunningDaemon` starts `probe run` on a config as a child process (optionally pinned to some CPUs), waits for
`/readyz`, reads its CPU and RSS from /proc, scrapes `/metrics` the way Prometheus does (its Accept and
Accept-Encoding headers, the whole body read), sends SIGHUP and waits for the reload to be logged, and stops it by
its pid. `SelfMetrics` is what one scrape said about the daemon itself (its lateness histogram, skipped slots,
saturation); `Histogram` turns two of them into the quantiles of what happened in between, as
`histogram_quantile` does. The `daemon` part of bench/run.py (bench/daemon.py) is built on these, and so can any
other part that wants a figure of the whole process rather than of its pieces in-process.
"""

from __future__ import annotations

import gzip
import http.client
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from common import HOST, Children, free_port, hwm_mb, probe_executable, proc_cpu_seconds, rss_mb

# What Prometheus 2.x sends when it scrapes (scrape.go's acceptHeader for the default protocols, and gzip).
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
LATENESS = "canary_scheduler_lateness_seconds"
# The daemon's own families come first in /metrics; the probes' (canary_probe_*, canary_channel_*) follow.
_PROBE_FAMILIES = re.compile(rb"^# (?:HELP|TYPE) canary_(?:probe|channel|platform)_", re.MULTILINE)
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)")
_LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')


def config_text(count: int, base_url: str, interval: float, *, jitter: float | None = None, timeout: float = 5.0,
                query: str = "", log_level: str = "info") -> str:
    """A config of `count` HTTP probes (the shipped api-health probe's checks, a fresh connection per run) against
    `base_url`/health. `query` is added to every URL, so a config with another query changes every probe."""
    head = (f'[daemon]\ninterval = "{interval:g}s"\ntimeout = "{timeout:g}s"\njitter = "{jitter if jitter is not None else interval:g}s"\n'
            f'shutdown_grace = "1s"\nlabels = {{ environment = "bench" }}\nlog_level = "{log_level}"\n\n')
    url = f"{base_url}/health{'?' + query if query else ''}"
    probe = ('[[probes]]\nname = "http-{i:05d}"\ntype = "http"\nchannel = "api"\nurl = "' + url + '"\n'
             'expect_status = [200]\nexpect_json = {{ status = "healthy", database = "active" }}\nchannel_map = "channels"\n\n')
    return head + "".join(probe.format(i=i) for i in range(count))


@dataclass
class SelfMetrics:
    """The daemon's own samples in one scrape, keyed by name and labels (static labels left out)."""

    at: float  # time.monotonic() when the scrape was sent
    seconds: float  # how long the whole scrape took, body read
    size: int  # bytes on the wire
    body_size: int  # bytes after decompression
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)
    # With `scrape(keep_body=True)`: the decompressed body, for `probe_totals` (parsing it takes the harness a while).
    body: bytes = b""

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum over every series of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, have), v in self.samples.items() if n == name and wanted <= have)

    def buckets(self, name: str = LATENESS) -> list[tuple[float, float]]:
        """(upper bound, cumulative count) of a histogram, in increasing order."""
        rows = []
        for (sample, labels), value in self.samples.items():
            if sample == f"{name}_bucket":
                le = dict(labels)["le"]
                rows.append((float("inf") if le == "+Inf" else float(le), value))
        return sorted(rows)


@dataclass
class Histogram:
    """What a cumulative histogram counted between two scrapes."""

    buckets: list[tuple[float, float]]  # (upper bound, count at or below it), increasing

    @classmethod
    def between(cls, before: SelfMetrics | None, after: SelfMetrics, name: str = LATENESS) -> "Histogram":
        old = dict(before.buckets(name)) if before is not None else {}
        return cls([(le, count - old.get(le, 0.0)) for le, count in after.buckets(name)])

    @property
    def count(self) -> float:
        return self.buckets[-1][1] if self.buckets else 0.0

    def quantile(self, q: float) -> float:
        """histogram_quantile: linear within the bucket the rank falls in; the highest finite bound for +Inf."""
        total = self.count
        if total <= 0:
            return float("nan")
        rank, lower, below = q * total, 0.0, 0.0
        for upper, cumulative in self.buckets:
            if cumulative >= rank:
                if upper == float("inf"):
                    return lower
                return lower + (upper - lower) * (rank - below) / max(cumulative - below, 1e-9)
            lower, below = upper, cumulative
        return lower

    def within(self, bound: float) -> float:
        """The share of observations at or below `bound` (which must be a bucket bound)."""
        return dict(self.buckets).get(bound, float("nan")) / self.count if self.count else float("nan")

    def max_bound(self) -> str:
        """The highest bucket anything fell in, as "≤ 25 ms" (or "> 1 s" for +Inf): all a histogram knows of a max."""
        previous, highest = 0.0, None
        for upper, cumulative in self.buckets:
            if cumulative > previous:
                highest = upper
            previous = cumulative
        if highest is None:
            return "none"
        if highest == float("inf"):
            finite = [upper for upper, _ in self.buckets if upper != float("inf")]
            return f"> {_short(finite[-1])}" if finite else "> 0"
        return f"≤ {_short(highest)}"

    def summary(self) -> str:
        if not self.count:
            return "no runs"
        return (f"p50 {self.quantile(0.5) * 1000:.2f} ms, p99 {self.quantile(0.99) * 1000:.2f} ms, max {self.max_bound()}; "
                f"{self.within(0.01) * 100:.2f}% within 10 ms (n={self.count:.0f})")


def _short(seconds: float) -> str:
    return f"{seconds * 1000:g} ms" if seconds < 1 else f"{seconds:g} s"


def parse_self_metrics(head: str, static: Iterable[str] = ()) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of the text or OpenMetrics format, keyed by name and labels without the `static` label names."""
    leave_out = set(static)
    samples = {}
    for row in head.splitlines():
        if not row or row.startswith("#"):
            continue
        match = _SAMPLE.match(row)
        if match is None:
            continue
        labels = frozenset((m.group("key"), m.group("value")) for m in _LABEL.finditer(match.group("labels") or "")
                           if m.group("key") not in leave_out)
        try:
            samples[(match.group("name"), labels)] = float(match.group("value"))
        except ValueError:
            continue
    return samples


_TOTALS = re.compile(rb'^canary_probe_(?:runs_total|failures_total)\{[^}]*?\b(result|reason)="([a-z_]+)"[^}]*\} (\S+)$', re.MULTILINE)


def probe_totals(body: bytes) -> dict[str, float]:
    """`canary_probe_runs_total` summed by result and `canary_probe_failures_total` by reason, over every probe."""
    totals: dict[str, float] = {}
    for match in _TOTALS.finditer(body):
        key = f"{match.group(1).decode()}={match.group(2).decode()}"
        totals[key] = totals.get(key, 0.0) + float(match.group(3))
    return totals


class RunningDaemon:
    """One `probe run` child process: started, scraped, reloaded and stopped by its pid (through `children`)."""

    def __init__(self, children: Children, config: Path, log: Path, *, cpus: set[int] | None = None,
                 static_labels: Iterable[str] = ("environment",), extra_args: Iterable[str] = ()) -> None:
        probe = probe_executable()
        if probe is None:
            raise RuntimeError("no `probe` executable beside this interpreter or on PATH (pip install -e . first)")
        self.port = free_port()
        self.log = log
        self._static = tuple(static_labels)
        self._log_handle = log.open("wb")
        self.started = time.monotonic()
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.proc = children.start(
            [str(probe), "run", "--config", str(config), "--listen", f"{HOST}:{self.port}", *extra_args],
            stdout=self._log_handle, stderr=subprocess.STDOUT, preexec_fn=pin,
        )
        self._children = children
        self.ready_after = float("nan")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds from the start until /readyz answered 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"probe run exited with {self.proc.returncode} before it was ready; see {self.log}")
            try:
                status, _, _ = self._get("/readyz", timeout=2.0)
                if status == 200:
                    self.ready_after = time.monotonic() - self.started
                    return self.ready_after
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"probe run not ready after {timeout:g}s; see {self.log}")

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def hwm_mb(self) -> float:
        return hwm_mb(self.pid)

    def _get(self, path: str, timeout: float, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()

    def scrape(self, timeout: float = 30.0, keep_body: bool = False) -> SelfMetrics:
        """One scrape as Prometheus sends it; the daemon's own samples parsed out of it."""
        at = time.monotonic()
        started = time.perf_counter()
        status, body, headers = self._get("/metrics", timeout, {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
        seconds = time.perf_counter() - started
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}: {body[:200]!r}")
        size = len(body)
        if headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        found = _PROBE_FAMILIES.search(body)
        head = body[: found.start() if found else len(body)].decode(errors="replace")
        return SelfMetrics(at, seconds, size, len(body), parse_self_metrics(head, self._static), body if keep_body else b"")

    def reloads_logged(self) -> int:
        return self.log.read_bytes().count(b"config reloaded:")

    def reload(self, timeout: float = 120.0) -> float:
        """SIGHUP, then wait until the log says the reload applied; returns how long that took."""
        before, failed = self.reloads_logged(), self.log.read_bytes().count(b"config reload failed")
        sent = time.monotonic()
        os.kill(self.pid, signal.SIGHUP)
        deadline = sent + timeout
        while time.monotonic() < deadline:
            if self.reloads_logged() > before:
                return time.monotonic() - sent
            if self.log.read_bytes().count(b"config reload failed") > failed:
                raise RuntimeError(f"the reload failed; see {self.log}")
            time.sleep(0.02)
        raise RuntimeError(f"no reload logged {timeout:g}s after SIGHUP; see {self.log}")

    def stop(self) -> None:
        self._children.stop(self.proc, timeout=30)
        self._log_handle.close()
