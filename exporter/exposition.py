"""The per-probe series in Prometheus text format, rendered once per result rather than once per scrape.

prometheus-client's generate_latest costs about 17 µs a series; with 10,000 probes (~150,000 series) a
scrape would take seconds. Instead each probe's lines are rendered when its result arrives (the store calls
`render`), cached with the record's version, and a scrape only joins cached strings family by family.
Series exist only for probes in the store, so a probe removed by a reload disappears on the next scrape.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from prometheus_client.utils import floatToGoString

from canary.state import ChannelState, ProbeRecord

# (name as exposed, TYPE, HELP); samples of a family must be contiguous, so the scrape walks this order.
CORE_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("canary_probe_success", "gauge", "Whether the probe's last run passed (1) or failed (0)."),
    ("canary_probe_duration_seconds", "gauge", "How long the probe's last run took."),
    ("canary_probe_phase_duration_seconds", "gauge", "How long each phase of the probe's last run took."),
    ("canary_probe_last_run_timestamp_seconds", "gauge", "When the probe's last run finished, in Unix time."),
    ("canary_probe_last_success_timestamp_seconds", "gauge",
     "When the probe last passed, in Unix time; 0 if it has not passed since it was configured."),
    ("canary_probe_interval_seconds", "gauge", "The probe's configured interval."),
    ("canary_probe_runs_total", "counter", "Runs of the probe, by result."),
    ("canary_probe_failures_total", "counter", "Failed runs of the probe, by reason."),
    ("canary_probe_latency_seconds", "histogram", "Distribution of the probe's run durations."),
)
_CORE_NAMES = frozenset(name for name, _, _ in CORE_FAMILIES)
_PLATFORM_HELP = "Whether the platform itself reports the channel up (its health endpoint's channel map)."
_CHANNEL_HELP = (
    "Whether every probe of the channel passed its last run and no probe saw the platform report it down."
)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def label_text(labels: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{key}="{escape_label_value(value)}"' for key, value in labels)


class ProbeExposition:
    def __init__(self, static_labels: dict[str, str], buckets: tuple[float, ...]) -> None:
        self._cache: dict[str, tuple[ProbeRecord, int, dict[str, bytes]]] = {}
        self._figure_meta: dict[str, tuple[str, str]] = {}  # family → (TYPE, HELP) of the figures probes measured
        self.configure(static_labels, buckets)

    def configure(self, static_labels: dict[str, str], buckets: tuple[float, ...]) -> None:
        """Apply a reloaded config: every cached fragment is stale."""
        self._static = dict(static_labels)
        self._buckets = buckets
        self._le = [floatToGoString(b) for b in buckets] + ["+Inf"]
        self._cache.clear()

    def _channel_families(self, channels: Mapping[str, ChannelState]) -> list[bytes]:
        static = label_text(sorted(self._static.items()))
        label_prefix = f"{static}," if static else ""
        lines: list[str] = []
        if channels:
            lines.append(f"# HELP canary_channel_up {_CHANNEL_HELP}\n# TYPE canary_channel_up gauge\n")
            lines += [
                f'canary_channel_up{{{label_prefix}channel="{escape_label_value(name)}",importance="{state.importance}"}} '
                f"{1 if state.up else 0}\n"
                for name, state in sorted(channels.items())
            ]
        reported = sorted((name, state.platform_up) for name, state in channels.items() if state.platform_up is not None)
        if reported:
            lines.append(f"# HELP canary_platform_channel_up {_PLATFORM_HELP}\n# TYPE canary_platform_channel_up gauge\n")
            lines += [
                f'canary_platform_channel_up{{{label_prefix}channel="{escape_label_value(name)}"}} {1 if up else 0}\n'
                for name, up in reported
            ]
        return [line.encode() for line in lines]

    def render(self, record: ProbeRecord) -> None:
        settings = record.settings
        labels = {**self._static, **settings.labels, "probe": settings.name, "channel": settings.channel, "type": settings.type}
        if settings.severity != "critical":  # only the exception is labelled, so most series stay short
            labels["importance"] = settings.severity  # not `severity`: alert rules set and route on that one
        base = label_text(sorted(labels.items()))
        out: dict[str, str] = {
            "canary_probe_interval_seconds": f"canary_probe_interval_seconds{{{base}}} {floatToGoString(settings.interval or 0)}\n",
            "canary_probe_runs_total": "".join(
                f'canary_probe_runs_total{{{base},result="{result}"}} {count}\n' for result, count in record.runs.items()
            ),
        }
        result = record.latest
        if result is not None:
            out["canary_probe_success"] = f"canary_probe_success{{{base}}} {1 if result.success else 0}\n"
            out["canary_probe_duration_seconds"] = (
                f"canary_probe_duration_seconds{{{base}}} {floatToGoString(result.duration_seconds)}\n"
            )
            out["canary_probe_last_run_timestamp_seconds"] = (
                f"canary_probe_last_run_timestamp_seconds{{{base}}} {floatToGoString(record.last_run_time)}\n"
            )
            out["canary_probe_last_success_timestamp_seconds"] = (
                f"canary_probe_last_success_timestamp_seconds{{{base}}} {floatToGoString(record.last_success_time)}\n"
            )
            if result.phases:
                out["canary_probe_phase_duration_seconds"] = "".join(
                    f'canary_probe_phase_duration_seconds{{{base},phase="{escape_label_value(phase)}"}} {floatToGoString(seconds)}\n'
                    for phase, seconds in sorted(result.phases.items())
                )
            for gauge in result.gauges:
                family = gauge.family
                if family in _CORE_NAMES:
                    continue
                self._figure_meta.setdefault(family, (gauge.kind, gauge.help))
                extra = f",{label_text(gauge.labels)}" if gauge.labels else ""
                out[family] = out.get(family, "") + f"{family}{{{base}{extra}}} {floatToGoString(gauge.value)}\n"
        if record.failures:
            out["canary_probe_failures_total"] = "".join(
                f'canary_probe_failures_total{{{base},reason="{reason}"}} {count}\n'
                for reason, count in sorted(record.failures.items())
            )
        cumulative, lines = 0, []
        for le, count in zip(self._le, record.bucket_counts):
            cumulative += count
            lines.append(f'canary_probe_latency_seconds_bucket{{{base},le="{le}"}} {cumulative}\n')
        lines.append(f"canary_probe_latency_seconds_sum{{{base}}} {floatToGoString(record.latency_sum)}\n")
        lines.append(f"canary_probe_latency_seconds_count{{{base}}} {cumulative}\n")
        out["canary_probe_latency_seconds"] = "".join(lines)
        # Stored encoded: a scrape then joins bytes once, with no str building or encoding of 30 MB.
        self._cache[settings.name] = (record, record.version, {name: text.encode() for name, text in out.items()})

    def exposition(
        self, records: list[ProbeRecord], channels: Mapping[str, ChannelState], prefix: bytes = b"", openmetrics: bool = False
    ) -> bytes:
        """`prefix` (the daemon's own metrics), then the channel families and every probe family, as one body.

        `openmetrics`: the headers in the OpenMetrics form (a counter's family is named without its `_total`, HELP
        escapes `"`) and the closing `# EOF`; `prefix` must then be OpenMetrics too, without its `# EOF`. The
        samples are the same in both formats."""
        fragments: list[dict[str, bytes]] = []
        fresh: dict[str, tuple[ProbeRecord, int, dict[str, bytes]]] = {}
        for record in records:
            name = record.settings.name
            cached = self._cache.get(name)
            if cached is None or cached[0] is not record or cached[1] != record.version:
                self.render(record)
                cached = self._cache[name]
            fresh[name] = cached
            fragments.append(cached[2])
        self._cache = fresh  # drops probes removed by a reload

        parts: list[bytes] = [prefix, *self._channel_families(channels)]
        extra_families = sorted({family for out in fragments for family in out} - _CORE_NAMES)
        families = [*CORE_FAMILIES, *((name, *self._figure_meta.get(name, ("gauge", ""))) for name in extra_families)]
        for name, kind, help_text in families:
            header = len(parts)
            parts.extend(out[name] for out in fragments if name in out)
            if len(parts) > header:
                family = name
                if openmetrics:
                    family = name.removesuffix("_total") if kind == "counter" else name
                    help_text = help_text.replace('"', '\\"')
                parts.insert(header, f"# HELP {family} {help_text}\n# TYPE {family} {kind}\n".encode())
        if openmetrics:
            parts.append(b"# EOF\n")
        return b"".join(parts)
