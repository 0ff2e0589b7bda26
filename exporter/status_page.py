"""The `/` status page and `/status.json`: an overall verdict, every channel and probe with its severity, uptime,
latency and last result, without Grafana.

The page is rendered here, whole, on every request; it needs no JavaScript. A few lines of script make it refresh
itself: every 10 s they fetch `/` again and swap the `#live` part in place (no reload, no flicker, the scroll
position kept); without script a `<noscript>` meta refresh reloads it every 30 s.

Order: critical probes failing (DOWN) first, then warning-only probes failing (WARN, which do not page), then probes
that have not run yet, then passing ones. Messages were scrubbed by the runner before they reached the store;
targets are the probes' `safe_target()`, as `probe list` shows them; everything here is HTML-escaped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from typing import Any, Mapping, Sequence

from canary import __version__
from canary.state import ChannelState, HistoryEntry, ProbeRecord
from canary.uptime import WINDOWS, Availability, UptimeBook

REFRESH_SECONDS = 10
# Probe and channel levels, in the page's order: what needs someone first.
LEVELS = ("down", "warn", "pending", "up")
_LABELS = {"down": "DOWN", "warn": "WARN", "pending": "PENDING", "up": "UP"}


@dataclass(frozen=True, slots=True)
class _Probe:
    record: ProbeRecord
    level: str
    uptime: dict[str, Availability]


def _level(record: ProbeRecord) -> str:
    if record.latest is None:
        return "pending"
    if record.latest.success:
        return "up"
    return "down" if record.settings.severity == "critical" else "warn"


def _state(record: ProbeRecord) -> str:
    """The state /status.json has always given: up, down or pending, whatever the severity."""
    if record.latest is None:
        return "pending"
    return "up" if record.latest.success else "down"


def _probes(records: Sequence[ProbeRecord], uptime: UptimeBook | None, now: float) -> list[_Probe]:
    empty = dict.fromkeys(WINDOWS, Availability())
    return [
        _Probe(record, _level(record), uptime.probe(record.settings.name, now) if uptime is not None else empty)
        for record in records
    ]


def _channel_level(state: ChannelState) -> str:
    if state.up:
        return "up"
    return "down" if state.importance == "critical" else "warn"


def _channel_uptime(name: str, state: ChannelState, probes: list[_Probe]) -> dict[str, Availability]:
    """A channel's runs and failures: those of its critical probes, or of all its probes when none is critical (as
    `canary_channel_up`'s importance and the SLO rules count them)."""
    own = [p for p in probes if p.record.settings.channel == name]
    if state.importance == "critical" and any(p.record.settings.severity == "critical" for p in own):
        own = [p for p in own if p.record.settings.severity == "critical"]
    return UptimeBook.combine(p.uptime for p in own)


@dataclass(frozen=True, slots=True)
class Verdict:
    status: str  # "critical", "warning", "ok" or "pending"
    headline: str
    critical_failing: int
    warnings: int
    passing: int
    pending: int


def verdict(probes: Sequence[_Probe]) -> Verdict:
    count = {level: sum(1 for p in probes if p.level == level) for level in LEVELS}
    down, warn, pending, up = count["down"], count["warn"], count["pending"], count["up"]
    warnings = f"{warn} warning{'s' if warn != 1 else ''}"
    if down:
        headline = f"{down} critical failing" + (f" · {warnings}" if warn else "")
        status = "critical"
    elif warn:
        headline = f"{warnings} · all critical probes passing"
        status = "warning"
    elif up:
        headline = "All operational"
        status = "ok"
    else:
        headline = "Waiting for the first results" if pending else "No probes configured"
        status = "pending"
    return Verdict(status, headline, down, warn, up, pending)


# --- /status.json ----------------------------------------------------------------------------------------------


def status_json(
    records: Sequence[ProbeRecord],
    channels: Mapping[str, ChannelState],
    uptime: UptimeBook | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    now = time.time() if now is None else now
    probes = _probes(records, uptime, now)
    overall = verdict(probes)
    return {
        "version": __version__,
        "generated_timestamp_seconds": round(now, 3),
        "overall": {
            "status": overall.status, "summary": overall.headline, "critical_failing": overall.critical_failing,
            "warnings": overall.warnings, "passing": overall.passing, "pending": overall.pending,
        },
        "channels": {name: state.up for name, state in channels.items()},
        "channel_details": {
            name: {
                "up": state.up,
                "importance": state.importance,
                "platform_up": state.platform_up,
                "uptime": _uptime_json(_channel_uptime(name, state, probes)),
            }
            for name, state in channels.items()
        },
        "probes": [
            {
                "name": r.settings.name,
                "type": r.settings.type,
                "channel": r.settings.channel,
                "severity": r.settings.severity,
                "description": r.settings.description,
                "runbook_url": r.settings.runbook_url,
                "target": r.settings.safe_target(),
                "state": _state(r),
                "reason": r.latest.reason if r.latest else None,
                "message": r.latest.message if r.latest else "",
                "duration_seconds": r.latest.duration_seconds if r.latest else None,
                "attempts": r.latest.attempts if r.latest else None,
                "last_run_timestamp_seconds": r.last_run_time or None,
                "last_success_timestamp_seconds": r.last_success_time or None,
                # Runs the canary's own overload starved: no verdict, so `state` above is the last real one.
                "starved_runs": r.starved,
                "starved_since_last_verdict": r.last_starved is not None,
                "last_starved_timestamp_seconds": r.last_starved_time or None,
                "uptime": _uptime_json(p.uptime),
                "history": [
                    {"timestamp_seconds": h.wall_time, "success": h.success, "reason": h.reason,
                     "duration_seconds": h.duration_seconds}
                    for h in r.history
                ],
            }
            for p in probes
            for r in (p.record,)
        ],
    }


def _uptime_json(figures: Mapping[str, Availability]) -> dict[str, dict[str, float | int | None]]:
    return {window: figures[window].as_json() for window in WINDOWS}


# --- readable figures ------------------------------------------------------------------------------------------


def readable_age(seconds: float) -> str:
    """"13 s ago", "2 min ago", "3 h ago", "4 d ago": whole units, rounded down, never a fraction."""
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return "just now"
    if seconds < 60:
        return f"{int(seconds)} s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 2 * 86400:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86400)} d ago"


def readable_duration(seconds: float) -> str:
    """"240 ms", "1.3 s", "14 s", "2.5 min": three significant digits at most."""
    if seconds < 0.0005:
        return "<1 ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


def readable_ratio(ratio: float | None) -> str:
    """Uptime as a percentage rounded down to two decimals, so a probe that failed once never reads 100%."""
    if ratio is None:
        return "–"
    if ratio >= 1.0:
        return "100%"
    shown = f"{math.floor(ratio * 10000) / 100:.2f}".rstrip("0").rstrip(".")
    return f"{shown}%"


def _ratio_class(ratio: float | None) -> str:
    if ratio is None:
        return "u-none"
    return "u-good" if ratio >= 0.999 else "u-fair" if ratio >= 0.99 else "u-poor"


def _utc(wall_time: float) -> datetime:
    return datetime.fromtimestamp(wall_time, timezone.utc)


def _time(wall_time: float, now: float) -> str:
    """A readable age, with the exact UTC time in `datetime` and on hover."""
    if not wall_time:
        return '<span class="muted">never</span>'
    moment = _utc(wall_time)
    exact = moment.strftime("%Y-%m-%d %H:%M:%S UTC")
    return (f'<time datetime="{moment.strftime("%Y-%m-%dT%H:%M:%SZ")}" title="{exact}">'
            f"{readable_age(now - wall_time)}</time>")


# --- the page ----------------------------------------------------------------------------------------------------


def render_status_page(
    records: Sequence[ProbeRecord],
    channels: Mapping[str, ChannelState],
    uptime: UptimeBook | None = None,
    now: float | None = None,
) -> str:
    now = time.time() if now is None else now
    probes = _probes(records, uptime, now)
    overall = verdict(probes)
    ordered = sorted(probes, key=lambda p: (LEVELS.index(p.level), p.record.settings.channel, p.record.settings.name))
    title = {"critical": "✖ ", "warning": "▲ "}.get(overall.status, "") + f"{overall.headline} · channel-canary"
    return _PAGE.format(
        title=escape(title),
        refresh_ms=REFRESH_SECONDS * 1000,
        version=escape(__version__),
        live=_live(overall, channels, probes, ordered, now),
    )


def _live(overall: Verdict, channels: Mapping[str, ChannelState], probes: list[_Probe], ordered: list[_Probe], now: float) -> str:
    """Everything that changes: the part the page's script swaps in on each refresh."""
    details = [
        f"{label}: {_names([p for p in ordered if p.level == level])}"
        for level, label in (("down", "Failing"), ("warn", "Warnings"))
        if any(p.level == level for p in ordered)
    ] + [f"{number} {label}" for number, label in ((overall.passing, "passing"), (overall.pending, "pending")) if number]
    starved = sum(1 for p in probes if p.record.last_starved is not None)
    if starved:  # the canary's own overload, not the platform's: said apart, and no probe's state changes for it
        details.append(f"canary overloaded: the last run of {starved} probe{'s' if starved > 1 else ''} was starved, "
                       "their last verdict is shown")
    generated = _utc(now)
    return (
        f'<div id="live" data-status="{overall.status}" data-generated="{now:.3f}">'
        f'<section class="banner {overall.status}" role="status" aria-live="polite">'
        f'<h2 id="verdict">{escape(overall.headline)}</h2>'
        f'<p>{" · ".join(details)}{" · " if details else ""}updated '
        f'<time datetime="{generated.strftime("%Y-%m-%dT%H:%M:%SZ")}">{generated.strftime("%H:%M:%S UTC")}</time></p>'
        "</section>"
        f"{_channels(channels, probes)}"
        f"{_probe_table(ordered, now)}"
        "</div>"
    )


def _names(probes: list[_Probe], most: int = 4) -> str:
    shown = ", ".join(escape(p.record.settings.name) for p in probes[:most])
    return shown + (f" and {len(probes) - most} more" if len(probes) > most else "")


def _badge(level: str) -> str:
    return f'<span class="badge {level}">{_LABELS[level]}</span>'


def _uptime_cells(figures: Mapping[str, Availability]) -> str:
    return "".join(
        f'<span class="up-figure {_ratio_class(figures[window].ratio)}" title="{_uptime_title(window, figures[window])}">'
        f"<small>{window}</small> {readable_ratio(figures[window].ratio)}</span>"
        for window in WINDOWS
    )


def _uptime_title(window: str, figures: Availability) -> str:
    if figures.runs <= 0:
        return f"no runs in the last {window}"
    mean = figures.mean_latency or 0.0
    return (f"{round(figures.runs)} runs, {round(figures.failures)} failed in the last {window}; "
            f"mean latency {readable_duration(mean)}")


def _channels(channels: Mapping[str, ChannelState], probes: list[_Probe]) -> str:
    if not channels:
        return ""
    cards = []
    for name, state in sorted(channels.items(), key=lambda item: (LEVELS.index(_channel_level(item[1])), item[0])):
        level = _channel_level(state)
        platform = ""
        if state.platform_up is False:
            platform = '<p class="note">the platform reports this channel down</p>'
        cards.append(
            f'<li class="channel {level}" data-channel="{escape(name)}">'
            f'<div class="channel-head"><b>{escape(name)}</b>{_badge(level)}</div>'
            f'<div class="uptime">{_uptime_cells(_channel_uptime(name, state, probes))}</div>'
            f'<p class="muted small">{"critical: pages" if state.importance == "critical" else "warning only"}</p>{platform}'
            "</li>"
        )
    return f'<section aria-label="Channels"><h2 class="section">Channels</h2><ul class="channels">{"".join(cards)}</ul></section>'


def _probe_table(ordered: list[_Probe], now: float) -> str:
    rows = [_probe_row(p, now) for p in ordered]
    body = "".join(rows) or '<tr><td colspan="7">No probes configured.</td></tr>'
    return (
        '<section aria-label="Probes"><h2 class="section">Probes</h2>'
        '<table class="probes"><thead><tr>'
        '<th scope="col">State</th><th scope="col">Probe</th><th scope="col">Channel</th>'
        '<th scope="col">Last result</th><th scope="col">Latency</th><th scope="col">Uptime</th>'
        '<th scope="col">Last run</th>'
        f"</tr></thead><tbody>{body}</tbody></table></section>"
    )


def _probe_row(probe: _Probe, now: float) -> str:
    record, level = probe.record, probe.level
    settings, latest = record.settings, record.latest
    runbook = ""
    if settings.runbook_url:
        runbook = (f' <a class="runbook" href="{escape(settings.runbook_url)}" target="_blank" '
                   'rel="noopener noreferrer">runbook</a>')
    description = f'<p class="desc">{escape(settings.description)}</p>' if settings.description else ""
    target = settings.safe_target()
    target_html = f'<p class="target"><code>{escape(target)}</code></p>' if target else ""
    if latest is None:
        result = '<span class="muted">not run yet</span>'
    else:
        reason = "" if latest.success else f'<b class="reason">{escape(latest.reason)}</b> '
        result = f'{reason}<span class="msg">{escape(latest.message) or ("passed" if latest.success else "")}</span>'
    latency = ""
    if latest is not None:
        latency = f'<span class="dur">{readable_duration(latest.duration_seconds)}</span>{_sparkline(record.history)}'
    last_success = ""
    if latest is not None and not latest.success:
        last_success = f'<br><small class="muted">last success {_time(record.last_success_time, now)}</small>'
    if record.last_starved is not None:
        result += (f'<br><small class="muted starved">starved {_time(record.last_starved_time, now)}: the canary was '
                   "too busy to finish the run, so it gives no verdict</small>")
    return (
        f'<tr class="probe {level}" data-probe="{escape(settings.name)}" data-severity="{settings.severity}">'
        f'<td class="state" data-label="State">{_badge(level)}<small class="sev sev-{settings.severity}">{settings.severity}</small></td>'
        f'<td class="name" data-label="Probe"><b>{escape(settings.name)}</b> <small class="muted">{escape(settings.type)}</small>'
        f"{runbook}{description}{target_html}</td>"
        f'<td class="channel-cell" data-label="Channel">{escape(settings.channel)}</td>'
        f'<td class="result" data-label="Last result">{result}</td>'
        f'<td class="latency" data-label="Latency">{latency}</td>'
        f'<td class="uptime" data-label="Uptime">{_uptime_cells(probe.uptime)}</td>'
        f'<td class="when" data-label="Last run">{_time(record.last_run_time, now)}{last_success}</td>'
        "</tr>"
    )


_SPARK_WIDTH, _SPARK_HEIGHT, _SPARK_PAD = 96, 24, 2.5


def _sparkline(history: list[HistoryEntry]) -> str:
    """The recent runs' durations as a small inline SVG line, failed runs marked with a red dot."""
    if not history:
        return ""
    durations = [h.duration_seconds for h in history]
    top = max(durations) or 1.0
    step = (_SPARK_WIDTH - 2 * _SPARK_PAD) / max(len(history) - 1, 1)
    points = [
        (_SPARK_PAD + i * step, _SPARK_HEIGHT - _SPARK_PAD - (d / top) * (_SPARK_HEIGHT - 2 * _SPARK_PAD))
        for i, d in enumerate(durations)
    ]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    failures = "".join(
        f'<circle class="fail" cx="{x:.1f}" cy="{y:.1f}" r="2.2"/>'
        for (x, y), entry in zip(points, history) if not entry.success
    )
    last_x, last_y = points[-1]
    summary = (f"latency of the last {len(history)} runs: {readable_duration(min(durations))} to "
               f"{readable_duration(max(durations))}, {sum(1 for h in history if not h.success)} failed")
    return (
        f'<svg class="spark" width="{_SPARK_WIDTH}" height="{_SPARK_HEIGHT}" viewBox="0 0 {_SPARK_WIDTH} {_SPARK_HEIGHT}" '
        f'role="img" aria-label="{summary}"><title>{summary}</title>'
        f'<polyline points="{line}"/>{failures}'
        f'<circle class="last" cx="{last_x:.1f}" cy="{last_y:.1f}" r="2"/></svg>'
    )


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<noscript><meta http-equiv="refresh" content="30"></noscript>
<title>{title}</title>
<style>
:root {{
  --bg: #f5f6f8; --card: #fff; --fg: #1b2230; --muted: #5d6878; --border: #e2e5ea; --link: #1558c0;
  --down: #c62828; --down-solid: #c62828; --down-fg: #fff; --down-tint: #fdeeee; --warn: #a15c00; --warn-line: #e39a1c; --warn-tint: #fff5e3;
  --up: #2e7d32; --up-tint: #e9f5ea; --pending: #6b7280; --pending-tint: #eef0f3; --spark: #5b7fb8;
}}
@media (prefers-color-scheme: dark) {{
  :root {{
    --bg: #0e1116; --card: #171b22; --fg: #e4e8ee; --muted: #98a2b1; --border: #2a313b; --link: #7fb0ff;
    --down: #ff6369; --down-solid: #b8282d; --down-fg: #fff; --down-tint: #3a1a1c; --warn: #ffb84d; --warn-line: #d9952a; --warn-tint: #33270f;
    --up: #4cc38a; --up-tint: #13291d; --pending: #9aa3b0; --pending-tint: #222832; --spark: #8fb1e8;
  }}
}}
* {{ box-sizing: border-box; }}
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "Liberation Sans", sans-serif; margin: 0;
  background: var(--bg); color: var(--fg); }}
a {{ color: var(--link); }}
header, main, footer {{ max-width: 1400px; margin: 0 auto; padding: 0 20px; }}
header {{ display: flex; flex-wrap: wrap; align-items: baseline; gap: 2px 12px; padding-top: 16px; }}
header h1 {{ font-size: 18px; margin: 0; white-space: nowrap; }}
.muted {{ color: var(--muted); }} .small, small {{ font-size: 12px; }}
.banner {{ border-radius: 10px; padding: 14px 18px; margin: 12px 0 18px; border: 1px solid transparent; }}
.banner h2 {{ margin: 0; font-size: 22px; }}
.banner p {{ margin: 4px 0 0; }}
.banner.critical {{ background: var(--down-solid); color: var(--down-fg); }}
.banner.warning {{ background: var(--warn-tint); color: var(--fg); border-color: var(--warn-line); border-left-width: 6px; }}
.banner.ok {{ background: var(--up-tint); color: var(--fg); border-left: 6px solid var(--up); }}
.banner.pending {{ background: var(--pending-tint); color: var(--fg); border-left: 6px solid var(--pending); }}
h2.section {{ font-size: 13px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); margin: 18px 0 8px; }}
.badge {{ display: inline-block; min-width: 4.6em; text-align: center; font-weight: 700; font-size: 12px; letter-spacing: .04em;
  padding: 2px 8px; border-radius: 4px; border: 1.5px solid transparent; }}
.badge.down {{ background: var(--down-solid); color: var(--down-fg); }}
.badge.warn {{ background: var(--warn-tint); color: var(--warn); border: 1.5px dashed var(--warn-line); }}
.badge.up {{ background: var(--up-tint); color: var(--up); border-color: var(--up); }}
.badge.pending {{ background: var(--pending-tint); color: var(--pending); border-color: var(--pending); }}
ul.channels {{ list-style: none; padding: 0; margin: 0; display: grid; gap: 10px;
  grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); }}
li.channel {{ background: var(--card); border: 1px solid var(--border); border-left: 5px solid var(--up); border-radius: 8px; padding: 10px 12px; }}
li.channel.down {{ border-left-color: var(--down); background: var(--down-tint); }}
li.channel.warn {{ border-left-color: var(--warn-line); background: var(--warn-tint); }}
li.channel p {{ margin: 4px 0 0; }}
.channel-head {{ display: flex; justify-content: space-between; align-items: center; gap: 8px; }}
.note {{ color: var(--down); font-size: 12px; }}
.uptime {{ font-variant-numeric: tabular-nums; }}
div.uptime {{ display: grid; grid-template-columns: repeat(3, 1fr); gap: 4px; margin-top: 8px; }}
div.uptime .up-figure small {{ display: block; }}
.up-figure {{ white-space: nowrap; }} td.uptime .up-figure {{ display: block; }}
.up-figure small {{ color: var(--muted); display: inline-block; min-width: 2.4em; font-weight: 400; }}
.u-good {{ color: var(--up); }} .u-fair {{ color: var(--warn); }} .u-poor {{ color: var(--down); font-weight: 600; }} .u-none {{ color: var(--muted); }}
table.probes {{ width: 100%; border-collapse: separate; border-spacing: 0; background: var(--card); border: 1px solid var(--border);
  border-radius: 8px; overflow: hidden; }}
table.probes th {{ text-align: left; font-size: 12px; color: var(--muted); font-weight: 600; padding: 8px 10px; border-bottom: 1px solid var(--border); }}
table.probes td {{ padding: 10px; vertical-align: top; border-bottom: 1px solid var(--border); }}
table.probes tr:last-child td {{ border-bottom: 0; }}
tr.probe td:first-child {{ border-left: 5px solid transparent; }}
tr.probe.down td {{ background: var(--down-tint); }} tr.probe.down td:first-child {{ border-left-color: var(--down); }}
tr.probe.warn td {{ background: var(--warn-tint); }} tr.probe.warn td:first-child {{ border-left-color: var(--warn-line); }}
td.state {{ white-space: nowrap; }} td.state .sev {{ display: block; margin-top: 4px; color: var(--muted); }}
td.name {{ min-width: 16em; max-width: 30em; }}
.desc {{ margin: 3px 0 0; }}
.target {{ margin: 3px 0 0; }} .target code {{ font-size: 12px; color: var(--muted); overflow-wrap: anywhere; }}
.runbook {{ font-size: 12px; margin-left: 4px; }}
td.result {{ max-width: 34em; overflow-wrap: anywhere; }}
.reason {{ color: var(--down); }} tr.warn .reason {{ color: var(--warn); }}
td.latency {{ white-space: nowrap; }} .dur {{ display: block; font-variant-numeric: tabular-nums; }}
svg.spark {{ display: block; margin-top: 4px; overflow: visible; }}
svg.spark polyline {{ fill: none; stroke: var(--spark); stroke-width: 1.5; stroke-linejoin: round; }}
svg.spark circle.fail {{ fill: var(--down); }} svg.spark circle.last {{ fill: var(--spark); }}
td.when {{ white-space: nowrap; }}
time[title] {{ text-decoration: underline dotted; text-underline-offset: 2px; cursor: help; }}
.legend {{ margin: 18px 0; display: flex; flex-wrap: wrap; gap: 8px 22px; color: var(--muted); font-size: 12px; }}
.legend span.item {{ display: inline-flex; align-items: center; gap: 6px; }}
#conn {{ color: var(--down); font-weight: 600; }}
footer {{ padding-bottom: 24px; }}
@media (max-width: 760px) {{
  header, main, footer {{ padding: 0 12px; }}
  .banner h2 {{ font-size: 19px; }}
  ul.channels {{ grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 8px; }}
  li.channel {{ padding: 8px 8px 8px 10px; }}
  div.uptime {{ font-size: 12px; gap: 6px; }}
  table.probes, table.probes tbody, table.probes tr, table.probes td {{ display: block; width: 100%; }}
  table.probes {{ background: none; border: 0; }}
  table.probes thead {{ display: none; }}
  table.probes tr.probe {{ background: var(--card); border: 1px solid var(--border); border-left: 5px solid var(--up);
    border-radius: 8px; margin-bottom: 10px; padding: 8px 10px; display: grid; grid-template-columns: 1fr 1fr; gap: 8px 12px;
    grid-template-areas: "state state" "name name" "result result" "latency uptime" "channel when"; }}
  table.probes tr.probe.down {{ border-left-color: var(--down); background: var(--down-tint); }}
  table.probes tr.probe.warn {{ border-left-color: var(--warn-line); background: var(--warn-tint); }}
  table.probes tr.probe.pending {{ border-left-color: var(--pending); }}
  table.probes td, tr.probe.down td, tr.probe.warn td {{ padding: 0; border: 0; background: none; max-width: none; min-width: 0; }}
  tr.probe td:first-child {{ border-left: 0; }}
  td.state {{ grid-area: state; display: flex !important; align-items: center; gap: 8px; }}
  td.state .sev {{ display: inline; margin: 0; }}
  td.name {{ grid-area: name; }} td.result {{ grid-area: result; }} td.latency {{ grid-area: latency; }}
  td.uptime {{ grid-area: uptime; }} td.channel-cell {{ grid-area: channel; }} td.when {{ grid-area: when; white-space: normal; }}
  td[data-label]:not(.state):not(.name)::before {{ content: attr(data-label); display: block; font-size: 11px;
    text-transform: uppercase; letter-spacing: .05em; color: var(--muted); }}
}}
@media (max-width: 340px) {{ ul.channels {{ grid-template-columns: minmax(0, 1fr); }} }}
</style></head>
<body>
<header><h1>channel-canary</h1><span class="muted small">synthetic probes of the support platform</span>
<span id="conn" class="small" hidden></span></header>
<main>
{live}
<section class="legend" aria-label="Legend">
<span class="item"><span class="badge down">DOWN</span> a critical probe failed: pages</span>
<span class="item"><span class="badge warn">WARN</span> a warning-only probe failed: shown, never pages</span>
<span class="item"><span class="badge up">UP</span> passed its last run</span>
<span class="item"><span class="badge pending">PENDING</span> not run yet</span>
<span class="item">Uptime: share of passing runs in the last 1 h, 24 h and 7 d, from hourly counts kept across restarts</span>
<span class="item"><svg class="spark" width="28" height="12" viewBox="0 0 28 12" aria-hidden="true"><polyline points="1,10 9,6 17,8 27,3"/><circle class="fail" cx="17" cy="8" r="2.2"/></svg>
latency of the recent runs; red dots failed</span>
</section>
</main>
<footer><p class="small muted">channel-canary {version} · <a href="/metrics">metrics</a> · <a href="/status.json">status.json</a> ·
hover a time for the exact UTC time</p></footer>
<script>
(function () {{
  // Progressive enhancement: swap in a fresh #live every few seconds; the page works the same without this.
  if (!window.fetch || !window.DOMParser) return;
  var conn = document.getElementById("conn"), root = document.documentElement, count = 0;
  function refresh() {{
    fetch(location.pathname, {{cache: "no-store", headers: {{"Accept": "text/html"}}}})
      .then(function (response) {{ if (!response.ok) throw new Error("HTTP " + response.status); return response.text(); }})
      .then(function (html) {{
        var fresh = new DOMParser().parseFromString(html, "text/html"), live = fresh.getElementById("live");
        if (!live) throw new Error("no status in the answer");
        document.getElementById("live").replaceWith(document.importNode(live, true));
        document.title = fresh.title;
        conn.hidden = true;
        root.setAttribute("data-refreshes", String(++count));
      }})
      .catch(function (error) {{
        conn.textContent = "no answer from the daemon (" + error.message + "); retrying";
        conn.hidden = false;
      }});
  }}
  root.setAttribute("data-refreshes", "0");
  setInterval(refresh, {refresh_ms});
}})();
</script>
</body></html>
"""
