"""The daemon's metrics about itself: scheduler lateness, skipped slots, config reloads, build, shard, process."""

from __future__ import annotations

import os
import platform
import time
from typing import Callable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry, Counter, Gauge, GCCollector, Histogram, Info, ProcessCollector, disable_created_metrics, generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics

from canary import __version__

# Up to 10 s, so an overloaded process (canary/saturation.py) shows how far behind it is, not only "over 1 s".
LATENESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SKIP_REASONS = ("overrun", "saturated")


class DaemonMetrics:
    """Lives in a private registry, so several daemons (or tests) in one process never collide."""

    def __init__(self, shard: int = 0, shards: int = 1, labels: dict[str, str] | None = None) -> None:
        # `_created` series double the self-metrics and no alert or panel reads them.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self._lateness = Histogram(
            "canary_scheduler_lateness_seconds",
            "How late probe runs started against their scheduled slot.",
            buckets=LATENESS_BUCKETS,
            registry=self.registry,
        )
        self._skipped = Counter(
            "canary_scheduler_skipped_runs",
            "Scheduled slots skipped: the probe's previous run was still going (overrun), or the process was too far "
            "behind to start a run that could finish (saturated).",
            ["reason"],
            registry=self.registry,
        )
        for reason in SKIP_REASONS:  # both from 0, so increase() sees the first skip
            self._skipped.labels(reason)
        self._starved = Counter(
            "canary_scheduler_starved_runs",
            "Runs that timed out while the process's own event loop was saturated: no verdict, counted in no probe's "
            "runs or failures.",
            registry=self.registry,
        )
        self._lag = Gauge(
            "canary_event_loop_lag_seconds",
            "The longest the process's event loop was behind its timers in the last 15 s.",
            registry=self.registry,
        )
        self._saturation = Gauge(
            "canary_saturation_ratio",
            "How saturated the process's event loop was over the last 15 s: 0 on time, towards 1 when it cannot keep up "
            "(the share of that time spent waiting for late timers).",
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "canary_scheduler_runs_in_flight", "Probe runs under way at the time of the scrape.", registry=self.registry,
        )
        self._reload_ok = Gauge(
            "canary_config_last_reload_successful",
            "Whether the last attempt to load the config succeeded (1) or failed (0).",
            registry=self.registry,
        )
        self._reload_time = Gauge(
            "canary_config_last_reload_success_timestamp_seconds",
            "When the config was last loaded successfully, in Unix time.",
            registry=self.registry,
        )
        self._probes = Gauge("canary_probes", "Probes in the running config.", registry=self.registry)
        # The revision comes from the build (an image sets CANARY_REVISION to its git commit); "unknown" otherwise.
        Info("canary_build", "The running channel-canary build.", registry=self.registry).info(
            {"version": __version__, "revision": os.environ.get("CANARY_REVISION") or "unknown",
             "python_version": platform.python_version()}
        )
        # Which share of the probes this process runs, so a rule can name the shard of a target that is down
        # (`up == 0` joined on instance). A single process is shard 0 of 1.
        Info("canary_shard", "The shard of the config's probes this process runs (I of N, from 0).", registry=self.registry).info(
            {"shard": str(shard), "shards": str(shards)}
        )
        # CPU, memory, open files and start time of this process (`process_*`), as every Prometheus exporter has.
        ProcessCollector(registry=self.registry)
        # Its garbage collections per generation (`python_gc_*`, as prometheus-client's default registry has): a
        # canary whose probes run late shows here whether full collections are the cause.
        GCCollector(registry=self.registry)
        self._labelled = _WithStaticLabels(self.registry, labels or {})

    def watch_leftovers(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Export the object ledger's size per probe, read from memory at each scrape (canary/ledger.py)."""
        self.registry.register(_Leftovers(counts))

    def set_labels(self, labels: dict[str, str]) -> None:
        """The config's `[daemon] labels`, carried by every series here too; a reload calls this with its own."""
        self._labelled.labels = dict(labels)

    def observe_lateness(self, seconds: float) -> None:
        self._lateness.observe(seconds)

    def count_skipped(self, name: str, slots: int, reason: str = "overrun") -> None:
        self._skipped.labels(reason).inc(slots)

    def count_starved(self, name: str) -> None:
        self._starved.inc()

    def watch(self, lag: Callable[[], float], saturation: Callable[[], float], in_flight: Callable[[], float]) -> None:
        """Read the loop's lag, its saturation and the runs in flight at each scrape (see canary/saturation.py)."""
        self._lag.set_function(lag)
        self._saturation.set_function(saturation)
        self._in_flight.set_function(in_flight)

    def config_loaded(self, ok: bool, probe_count: int | None = None) -> None:
        self._reload_ok.set(1 if ok else 0)
        if ok:
            self._reload_time.set(time.time())
            if probe_count is not None:
                self._probes.set(probe_count)

    def exposition(self, openmetrics_format: bool = False) -> bytes:
        """The classic text format, or OpenMetrics without its closing `# EOF` (the probe families follow it)."""
        if openmetrics_format:
            return openmetrics.generate_latest(self._labelled).removesuffix(b"# EOF\n")
        return generate_latest(self._labelled)


class _WithStaticLabels:
    """The registry as a scrape sees it: every sample also carries the static labels (a sample's own label of the
    same name wins). Read at each scrape, so a reload's new labels apply from the next one."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self._registry = registry
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        labels = self.labels
        for family in self._registry.collect():  # fresh families on every call, so they can be changed
            if labels:
                family.samples = [sample._replace(labels={**labels, **sample.labels}) for sample in family.samples]
            yield family


class _Leftovers:
    """`canary_orphaned_objects{probe}`: objects runs created on the platform that no run still owns and nobody has
    removed yet (a killed process's, or ones the platform refused to delete), 0 for each running probe that creates
    objects."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "canary_orphaned_objects",
            "Synthetic objects (tickets) runs created on the platform and nobody has removed yet, per probe.",
            labels=["probe"],
        )
        for probe, count in sorted(self._counts().items()):
            family.add_metric([probe], count)
        yield family

