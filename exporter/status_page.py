"""The `/` status page and `/status.json`: every probe's state, last result and recent history, without Grafana.

Messages were scrubbed by the runner before they reached the store; everything here is HTML-escaped.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from html import escape
from typing import Any

from canary import __version__
from canary.contract import format_duration
from canary.state import ProbeRecord


def status_json(records: list[ProbeRecord], channels: dict[str, bool]) -> dict[str, Any]:
    return {
        "version": __version__,
        "channels": channels,
        "probes": [
            {
                "name": r.settings.name,
                "type": r.settings.type,
                "channel": r.settings.channel,
                "target": r.settings.safe_target(),
                "state": _state(r),
                "reason": r.latest.reason if r.latest else None,
                "message": r.latest.message if r.latest else "",
                "duration_seconds": r.latest.duration_seconds if r.latest else None,
                "last_run_timestamp_seconds": r.last_run_time or None,
                "last_success_timestamp_seconds": r.last_success_time or None,
                "history": [
                    {"timestamp_seconds": h.wall_time, "success": h.success, "reason": h.reason,
                     "duration_seconds": h.duration_seconds}
                    for h in r.history
                ],
            }
            for r in records
        ],
    }


def _state(record: ProbeRecord) -> str:
    if record.latest is None:
        return "pending"
    return "up" if record.latest.success else "down"


def _ago(wall_time: float, now: float) -> str:
    return f"{format_duration(max(now - wall_time, 0.0))} ago" if wall_time else "never"


def _stamp(wall_time: float) -> str:
    return datetime.fromtimestamp(wall_time, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def render_status_page(records: list[ProbeRecord], channels: dict[str, bool]) -> str:
    now = time.time()
    channel_cells = "".join(
        f'<span class="pill {"up" if up else "down"}">{escape(name)} {"up" if up else "DOWN"}</span>'
        for name, up in sorted(channels.items())
    ) or '<span class="pill pending">no results yet</span>'
    rows = []
    for record in sorted(records, key=lambda r: (_state(r) != "down", r.settings.channel, r.settings.name)):
        state, latest = _state(record), record.latest
        history = "".join(
            f'<i class="{"up" if h.success else "down"}" title="{escape(_stamp(h.wall_time))} '
            f'{escape(h.reason)} {h.duration_seconds * 1000:.0f} ms"></i>'
            for h in record.history
        )
        rows.append(
            "<tr>"
            f'<td class="state {state}">{state.upper()}</td>'
            f"<td><b>{escape(record.settings.name)}</b><br><small>{escape(record.settings.safe_target())}</small></td>"
            f"<td>{escape(record.settings.channel)}</td>"
            f"<td>{escape(record.settings.type)}</td>"
            f"<td>{escape(latest.reason) if latest else ''}</td>"
            f"<td>{f'{latest.duration_seconds * 1000:.0f} ms' if latest else ''}</td>"
            f"<td>{_ago(record.last_run_time, now)}</td>"
            f"<td>{_ago(record.last_success_time, now)}</td>"
            f'<td class="msg">{escape(latest.message) if latest else ""}</td>'
            f'<td class="hist">{history}</td>'
            "</tr>"
        )
    return _PAGE.format(
        version=escape(__version__),
        generated=escape(_stamp(now)),
        channels=channel_cells,
        rows="".join(rows) or '<tr><td colspan="10">No probes configured.</td></tr>',
    )


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>channel-canary</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .35em .6em; border-bottom: 1px solid #ddd; vertical-align: top; }}
small {{ color: #666; }}
.pill {{ display: inline-block; padding: .2em .7em; margin: 0 .4em .4em 0; border-radius: 1em; color: #fff; }}
.up {{ background: #2e7d32; }} .down {{ background: #c62828; }} .pending {{ background: #888; }}
td.state {{ color: #fff; font-weight: bold; }}
td.msg {{ max-width: 32em; overflow-wrap: anywhere; }}
.hist i {{ display: inline-block; width: 7px; height: 16px; margin-right: 1px; }}
</style></head>
<body>
<h1>channel-canary</h1>
<p>{channels}</p>
<table>
<tr><th>State</th><th>Probe</th><th>Channel</th><th>Type</th><th>Reason</th><th>Duration</th>
<th>Last run</th><th>Last success</th><th>Message</th><th>History (oldest → newest)</th></tr>
{rows}
</table>
<p><small>channel-canary {version} · generated {generated} · <a href="/metrics">metrics</a> ·
<a href="/status.json">status.json</a></small></p>
</body></html>
"""
