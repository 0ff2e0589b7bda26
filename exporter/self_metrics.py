"""The daemon's metrics about itself: scheduler lateness, skipped slots, config reloads, build, shard, process."""

from __future__ import annotations

import os
import platform
import time
from typing import Iterator

from prometheus_client import (
    CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, disable_created_metrics, generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics

from canary import __version__

LATENESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


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
            "Scheduled slots skipped because the probe's previous run was still going.",
            registry=self.registry,
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
        self._labelled = _WithStaticLabels(self.registry, labels or {})

    def set_labels(self, labels: dict[str, str]) -> None:
        """The config's `[daemon] labels`, carried by every series here too; a reload calls this with its own."""
        self._labelled.labels = dict(labels)

    def observe_lateness(self, seconds: float) -> None:
        self._lateness.observe(seconds)

    def count_skipped(self, name: str, slots: int) -> None:
        self._skipped.inc(slots)

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
