"""The per-probe series in Prometheus text format, rendered once per result rather than once per scrape, and
served gzip-compressed without compressing the whole body at each scrape.

prometheus-client's generate_latest costs about 17 µs a series; with 10,000 probes (~150,000 series) a
scrape would take seconds. Instead each probe's lines are rendered when its result arrives (the store calls
`render`), cached with the record's version, and a scrape only joins cached strings family by family.
Series exist only for probes in the store, so a probe removed by a reload disappears on the next scrape.

Compressed scrapes. A gzip stream may be several gzip members one after another (RFC 1952 2.2); Go's gzip reader,
which Prometheus scrapes with, reads them as one stream. So the gzip body is assembled from members compressed at
different times, and decompresses byte for byte to the plain body. The body goes family by family, so one probe's
lines lie in ~10 places, one fragment per family:
- a fragment of several lines (the latency histogram, phases, failure counters) compresses well on its own: it is
  compressed once, when it is rendered, and then kept compressed only (a sixth of the memory; a plain scrape
  decompresses it). Until some scraper asks for gzip, nothing is compressed;
- a fragment of a line or two does not (~120 bytes a line, mostly label text that appears nowhere else in its
  member): a family's short fragments are compressed together, CHUNK probes at a time, when a scrape needs the
  chunk. A chunk stays compressed until one of its probes renders different bytes for that family, so lines that
  rarely change (interval, success, a figure's limit) are not compressed again.
"""

from __future__ import annotations

import zlib
from typing import Iterable, Iterator, Mapping

from prometheus_client.utils import floatToGoString

from canary.state import ChannelState, ProbeRecord

# (name as exposed, TYPE, HELP); samples of a family must be contiguous, so the scrape walks this order.
CORE_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("canary_probe_success", "gauge", "Whether the probe's last run passed (1) or failed (0)."),
    ("canary_probe_duration_seconds", "gauge", "How long the probe's last run took."),
    ("canary_probe_attempts", "gauge", "How many attempts the probe's last run made (1 unless it retried a transient failure)."),
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
CHUNK = 128  # probes per compressed chunk of a family's short fragments
RENDER_SLICE = 250  # probes rendered between two chances for the event loop, while a scrape lays the probes out
ALONE_LINES = 3  # a fragment of at least this many lines is compressed on its own, when it is rendered
GZIP_LEVEL = 1  # level 6 makes the body 5 % smaller for 43 % more scrape time (README, Benchmarks)
_EOF = b"# EOF\n"


class StaleLayout(Exception):
    """The probes were laid out anew (a reload) while a scrape was assembled a slice at a time."""


def gzip_member(data: bytes) -> bytes:
    """One complete gzip member (header, deflate data, CRC-32 and length); members concatenate into a gzip stream."""
    return zlib.compress(data, GZIP_LEVEL, wbits=31)


_EOF_MEMBER = gzip_member(_EOF)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def label_text(labels: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{key}="{escape_label_value(value)}"' for key, value in labels)


class _Entry:
    """One probe's rendered lines by family: `fragments` as text, `packed` compressed only, each with the
    fingerprint (hash, length) of its text to tell an unchanged one without keeping the text."""

    __slots__ = ("record", "version", "fragments", "packed")

    def __init__(
        self, record: ProbeRecord, fragments: dict[str, bytes], packed: dict[str, tuple[tuple[int, int], bytes]]
    ) -> None:
        self.record = record
        self.version = record.version
        self.fragments = fragments
        self.packed = packed


class ProbeExposition:
    def __init__(self, static_labels: dict[str, str], buckets: tuple[float, ...]) -> None:
        self._entries: dict[str, _Entry] = {}
        self._figure_meta: dict[str, tuple[str, str]] = {}  # family → (TYPE, HELP) of the figures probes measured
        # The order of the last scrape's records and, per family and in that order: each probe's lines as text
        # (b"" for none, or when kept compressed only), the gzip member of lines compressed alone (b"": not yet,
        # the text is in the slot; None: short lines), and the gzip form of each chunk (None: not compressed yet).
        self._layout: list[ProbeRecord] = []
        self._versions: list[int] = []
        self._position: dict[str, int] = {}
        self._slots: dict[str, list[bytes]] = {}
        self._alone: dict[str, list[bytes | None]] = {}
        self._chunks: dict[str, list[bytes | None]] = {}
        self._header_members: dict[bytes, bytes] = {}
        # Set by the first gzip scrape. From then on, lines compressed alone are kept compressed only (a sixth of the
        # memory), and a plain scrape decompresses them.
        self._compress_on_render = False
        # Bumped whenever the layout is replaced: a scrape assembled a slice at a time (see `exposition_parts`)
        # must not mix two layouts.
        self._generation = 0
        self._configured: tuple[dict[str, str], tuple[float, ...]] | None = None
        self.configure(static_labels, buckets)

    def configure(self, static_labels: dict[str, str], buckets: tuple[float, ...]) -> None:
        """Apply a reloaded config. New static labels or buckets make every cached fragment stale; otherwise only
        those of the probes the reload changed are (the store gave them new records), and a scrape re-renders them."""
        if self._configured == (static_labels, buckets):
            return
        self._configured = (dict(static_labels), buckets)
        self._static = dict(static_labels)
        self._buckets = buckets
        self._le = [floatToGoString(b) for b in buckets] + ["+Inf"]
        self._entries.clear()
        self._header_members.clear()
        self._generation += 1
        self._layout, self._versions, self._position = [], [], {}  # laid out anew by the next scrape
        self._slots, self._alone, self._chunks = {}, {}, {}

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
            out["canary_probe_attempts"] = f"canary_probe_attempts{{{base}}} {result.attempts}\n"
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
        self._store(record, {name: text.encode() for name, text in out.items()})

    def _store(self, record: ProbeRecord, fragments: dict[str, bytes]) -> None:
        """Keep the new fragments; an unchanged one keeps its old bytes object or gzip member, so the chunks holding
        it stay compressed. Placed in the layout at once when the probe is in it."""
        name = record.settings.name
        old = self._entries.get(name)
        packed: dict[str, tuple[tuple[int, int], bytes]] = {}
        alone: dict[str, bytes] = {}  # family → what `_alone` holds for it: the member, or b"" while it stays text
        for family, data in list(fragments.items()):
            if data.count(b"\n") >= ALONE_LINES and self._compress_on_render:
                del fragments[family]
                fingerprint = (hash(data), len(data))
                previous = old.packed.get(family) if old is not None else None
                packed[family] = previous if previous is not None and previous[0] == fingerprint else (fingerprint, gzip_member(data))
                alone[family] = packed[family][1]
                continue
            previous_text = old.fragments.get(family) if old is not None else None
            if previous_text is not None and previous_text == data:
                fragments[family] = previous_text
            if data.count(b"\n") >= ALONE_LINES:
                alone[family] = b""
        entry = self._entries[name] = _Entry(record, fragments, packed)
        position = self._position.get(name)
        if position is None or position >= len(self._layout) or self._layout[position] is not record:
            return  # not in the layout (a reload changed the probes): the next scrape lays them out anew
        self._versions[position] = entry.version
        families = fragments.keys() | packed.keys()
        if old is not None:
            families |= old.fragments.keys() | old.packed.keys()
        for family in families:
            data, member = fragments.get(family, b""), alone.get(family)
            slots = self._slots.get(family)
            if slots is None:  # a figure no probe in the layout had before
                slots = self._new_family(family)
            if slots[position] is not data or self._alone[family][position] is not member:
                slots[position] = data
                self._alone[family][position] = member
                self._chunks[family][position // CHUNK] = None

    def _new_family(self, family: str) -> list[bytes]:
        count = len(self._layout)
        self._alone[family] = [None] * count
        self._chunks[family] = [None] * -(-count // CHUNK)
        slots = self._slots[family] = [b""] * count
        return slots

    def _lay_out(self, records: list[ProbeRecord]) -> Iterator[bytes]:
        """Match the cache to `records`, the store's probes in order: render what is missing or stale, and lay the
        fragments out anew when the probes themselves changed (a reload, or the first scrape).

        A generator that yields b"" between slices of rendering (10,000 renders hold the loop ~0.3 s), so a caller
        on the event loop can let due probes run; while it renders, the layout is empty, so results recorded
        meanwhile only update their entries."""
        if records == self._layout:  # the same record objects, in the same order
            if [record.version for record in records] != self._versions:
                for record, version in zip(records, self._versions):
                    if record.version != version:
                        self.render(record)
            return
        self._generation += 1
        generation = self._generation
        # The old layout may hold the last references to a reload's replaced records: let them go a slice at a time
        # (freeing 10,000 records with their results and histories at once holds the loop ~20 ms).
        retired, self._layout = self._layout, []
        self._position = {record.settings.name: index for index, record in enumerate(records)}
        self._entries = {name: entry for name, entry in self._entries.items() if name in self._position}
        for count, record in enumerate(records, 1):
            entry = self._entries.get(record.settings.name)
            if entry is None or entry.record is not record or entry.version != record.version:
                self.render(record)
            if count % RENDER_SLICE == 0:
                del retired[-RENDER_SLICE:]
                yield b""
                self._check(generation)
        while retired:
            del retired[-RENDER_SLICE:]
            yield b""
            self._check(generation)
        # From here results recorded between slices update their own slots (the layout is in place), and the slices
        # below place every other probe's fragments.
        self._layout = list(records)
        self._versions = [record.version for record in records]
        self._slots, self._alone, self._chunks = {}, {}, {}
        for index, record in enumerate(records):
            entry = self._entries[record.settings.name]
            for family, data in entry.fragments.items():
                slots = self._slots.get(family) or self._new_family(family)
                slots[index] = data
                self._alone[family][index] = b"" if data.count(b"\n") >= ALONE_LINES else None
            for family, (_, member) in entry.packed.items():
                self._slots.get(family) or self._new_family(family)
                self._slots[family][index] = b""
                self._alone[family][index] = member
            if (index + 1) % RENDER_SLICE == 0:
                yield b""
                self._check(generation)

    def _check(self, generation: int) -> None:
        if self._generation != generation:
            raise StaleLayout("the probes were laid out anew while this scrape was assembled")

    def _families(self, openmetrics: bool) -> Iterator[tuple[str, bytes]]:
        """Each family in the layout, in exposition order, with its HELP and TYPE lines."""
        extra = sorted(self._slots.keys() - _CORE_NAMES)
        for name, kind, help_text in (*CORE_FAMILIES, *((name, *self._figure_meta.get(name, ("gauge", ""))) for name in extra)):
            if name not in self._slots:
                continue
            family = name
            if openmetrics:
                family = name.removesuffix("_total") if kind == "counter" else name
                help_text = help_text.replace('"', '\\"')
            yield name, f"# HELP {family} {help_text}\n# TYPE {family} {kind}\n".encode()

    def exposition(
        self, records: list[ProbeRecord], channels: Mapping[str, ChannelState], prefix: bytes = b"", openmetrics: bool = False
    ) -> bytes:
        """`prefix` (the daemon's own metrics), then the channel families and every probe family, as one body.

        `openmetrics`: the headers in the OpenMetrics form (a counter's family is named without its `_total`, HELP
        escapes `"`) and the closing `# EOF`; `prefix` must then be OpenMetrics too, without its `# EOF`. The
        samples are the same in both formats."""
        return b"".join(self.exposition_parts(records, channels, prefix, openmetrics))

    def gzip_exposition(
        self, records: list[ProbeRecord], channels: Mapping[str, ChannelState], prefix: bytes = b"", openmetrics: bool = False
    ) -> bytes:
        """The same body as `exposition`, gzip-compressed: concatenated gzip members, most of them kept between
        scrapes (see the module's docstring)."""
        return b"".join(self.gzip_parts(records, channels, prefix, openmetrics))

    # The bodies as generators of their parts: joined at once by the methods above, or a slice at a time by the
    # scrape handler, which lets due probes run between slices (a whole scrape of 10,000 probes is 50-150 ms of
    # work, 0.4 s after a reload). Between slices results may be recorded: each part is taken as it is when reached,
    # so the body is what a scrape a few milliseconds long sees, never two layouts (StaleLayout then).

    def exposition_parts(
        self, records: list[ProbeRecord], channels: Mapping[str, ChannelState], prefix: bytes = b"", openmetrics: bool = False
    ) -> Iterator[bytes]:
        yield from self._lay_out(records)
        generation = self._generation
        slots_by_family, alone_by_family = self._slots, self._alone
        families = list(self._families(openmetrics))
        yield b"".join([prefix, *self._channel_families(channels)])
        self._check(generation)
        for name, header in families:
            slots, alone = slots_by_family[name], alone_by_family[name]
            if any(alone):  # some lines are kept compressed only
                yield header
                for data, member in zip(slots, alone):
                    yield zlib.decompress(member, wbits=31) if member else data
                    self._check(generation)
            elif any(slots):
                yield header + b"".join(slots)
                self._check(generation)
        if openmetrics:
            yield _EOF

    def gzip_parts(
        self, records: list[ProbeRecord], channels: Mapping[str, ChannelState], prefix: bytes = b"", openmetrics: bool = False
    ) -> Iterator[bytes]:
        self._compress_on_render = True
        yield from self._lay_out(records)
        generation = self._generation
        chunks_by_family = self._chunks
        families = list(self._families(openmetrics))
        yield gzip_member(b"".join([prefix, *self._channel_families(channels)]))
        self._check(generation)
        for name, header in families:
            chunks = chunks_by_family[name]
            if not any(chunk is None or chunk for chunk in chunks):
                continue  # no line of this family in any probe
            member = self._header_members.get(header)
            if member is None:
                member = self._header_members[header] = gzip_member(header)
            parts: list[bytes] = []
            for index in range(len(chunks)):
                chunk = chunks[index]
                if chunk is None:
                    chunk = chunks[index] = self._compress_chunk(name, index)
                parts.append(chunk)
                yield b""  # a slice boundary: compressing a chunk is the work
                self._check(generation)
            if any(parts):
                yield member + b"".join(parts)
        if openmetrics:
            yield _EOF_MEMBER

    def _compress_chunk(self, family: str, index: int) -> bytes:
        """Chunk `index` of a family: runs of short fragments compressed together, between the members of the
        fragments compressed alone."""
        start, end = index * CHUNK, (index + 1) * CHUNK
        slots, alone = self._slots[family][start:end], self._alone[family][start:end]
        if alone.count(None) == len(alone):  # short fragments only (the common case): one member
            samples = b"".join(slots)
            return gzip_member(samples) if samples else b""
        members: list[bytes] = []
        run: list[bytes] = []
        for position, data, member in zip(range(start, end), slots, alone):
            if member is None:
                if data:
                    run.append(data)
                continue
            if run:
                members.append(gzip_member(b"".join(run)))
                run = []
            if not member:  # rendered before any scrape asked for gzip: from now on it is kept compressed only
                member = gzip_member(data)
                entry = self._entries[self._layout[position].settings.name]
                entry.packed[family] = ((hash(data), len(data)), member)
                del entry.fragments[family]
                self._slots[family][position], self._alone[family][position] = b"", member
            members.append(member)
        if run:
            members.append(gzip_member(b"".join(run)))
        return b"".join(members)
