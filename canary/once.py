"""`probe --once`: every selected probe once, concurrently, reported as a table, JSON or JUnit XML."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable, Iterable

from canary.config import Config
from canary.contract import Probe, ProbeSettings, Result, printable
from canary.janitor import Janitor
from canary.ledger import Ledger, building_with
from canary.runner import run_once
from canary.saturation import LoopMonitor, judge
from canary.scheduler import ProbeBuildError

log = logging.getLogger("canary.once")


@dataclass(frozen=True)
class Outcome:
    settings: ProbeSettings
    result: Result

    @property
    def verdict(self) -> str:
        """PASS, FAIL, WARN for a failed probe of severity "warning" (which does not fail the run), or STARVED for a
        run that timed out while this process was too busy to finish it (no verdict either way)."""
        if self.result.success:
            return "PASS"
        if self.result.reason == "starved":
            return "STARVED"
        return "WARN" if self.settings.severity == "warning" else "FAIL"


def all_passed(outcomes: list[Outcome]) -> bool:
    """No FAIL, and no STARVED either: a run the machine starved proved nothing, so the check did not pass."""
    return all(o.verdict not in ("FAIL", "STARVED") for o in outcomes)


def select(probes: Iterable[ProbeSettings], only: list[str]) -> list[ProbeSettings]:
    """Probes whose name or channel is in `only` (all of them when `only` is empty)."""
    wanted = set(only)
    return [p for p in probes if not wanted or p.name in wanted or p.channel in wanted]


async def run_all(
    config: Config, probes: list[ProbeSettings], build_probe: Callable[[ProbeSettings], Probe],
    ledger: Ledger | None = None,
) -> list[Outcome]:
    """Every probe once, concurrently. Raises ProbeBuildError, before anything ran, when one cannot be built.

    With a `ledger`, what the runs create is recorded there like the daemon's runs do, and meanwhile one janitor pass
    removes the leftovers of earlier runs that have fallen due (never those of a run that may still be in flight)."""
    scrub = config.scrubber()
    built: list[tuple[ProbeSettings, Probe]] = []
    build = build_probe if ledger is None else building_with(ledger, build_probe)
    for settings in probes:
        try:
            built.append((settings, build(settings)))
        except Exception as exc:  # noqa: BLE001 - reported as a config problem, like the daemon does
            await asyncio.gather(*(probe.close() for _, probe in built), return_exceptions=True)
            raise ProbeBuildError(settings.name, scrub(f"{type(exc).__name__}: {exc}")) from None

    monitor = LoopMonitor()  # a run that times out while this process is starved of CPU is STARVED, not FAIL
    monitor.start()

    async def one(settings: ProbeSettings, probe: Probe) -> Outcome:
        timeout = settings.timeout or 10.0
        try:
            since = monitor.reading()
            return Outcome(settings, judge(await run_once(probe, timeout, scrub), timeout, monitor, since))
        finally:
            await probe.close()

    async def clean_leftovers() -> None:
        if ledger is not None:
            try:
                await Janitor(ledger, build_probe).clean(config.probes)
            except Exception:  # noqa: BLE001 - a bug here must not spoil the report
                log.exception("removing leftover synthetic objects failed")

    try:
        outcomes = await asyncio.gather(clean_leftovers(), *(one(settings, probe) for settings, probe in built))
    finally:
        monitor.stop()
    return list(outcomes[1:])


def as_json(outcomes: list[Outcome]) -> str:
    results = [
        {
            "name": o.settings.name,
            "type": o.settings.type,
            "channel": o.settings.channel,
            "success": o.result.success,
            "severity": o.settings.severity,
            "reason": o.result.reason,
            "duration_seconds": round(o.result.duration_seconds, 6),
            "attempts": o.result.attempts,
            "message": o.result.message,
            "channels": dict(sorted(o.result.channels.items())),
            "phases": {k: round(v, 6) for k, v in sorted(o.result.phases.items())},
            "checks": [{"passed": c.passed, "text": c.text} for c in o.result.checks],
        }
        for o in outcomes
    ]
    verdicts = [o.verdict for o in outcomes]
    return json.dumps(
        {"results": results, "passed": verdicts.count("PASS"), "failed": verdicts.count("FAIL"),
         "warnings": verdicts.count("WARN"), "starved": verdicts.count("STARVED")},
        indent=2,
    )


def as_junit(outcomes: list[Outcome]) -> str:
    failures = sum(o.verdict == "FAIL" for o in outcomes)
    warnings = sum(o.verdict == "WARN" for o in outcomes)
    total_time = sum(o.result.duration_seconds for o in outcomes)
    suites = ET.Element("testsuites", name="channel-canary", tests=str(len(outcomes)), failures=str(failures))
    suite = ET.SubElement(
        suites, "testsuite", name="channel-canary", tests=str(len(outcomes)),
        failures=str(failures), errors=str(sum(o.verdict == "STARVED" for o in outcomes)), skipped=str(warnings),
        time=f"{total_time:.3f}",
    )
    for o in outcomes:
        case = ET.SubElement(
            suite, "testcase", classname=f"{o.settings.channel}.{o.settings.type}",
            name=o.settings.name, time=f"{o.result.duration_seconds:.3f}",
        )
        properties = ET.SubElement(case, "properties")
        ET.SubElement(properties, "property", name="attempts", value=str(o.result.attempts))
        for name, up in sorted(o.result.channels.items()):
            ET.SubElement(properties, "property", name=f"channel.{printable(name)}", value="up" if up else "down")
        message = _xml_text(o.result.message)
        if o.verdict == "WARN":  # shown, but not a failed build
            ET.SubElement(case, "skipped", type="warning", message=f"{o.result.reason}: {message}")
        elif o.verdict == "STARVED":  # no verdict on the target; the run as a whole still fails (see all_passed)
            ET.SubElement(case, "error", type="starved", message=message)
        elif not o.result.success:
            failure = ET.SubElement(case, "failure", type=o.result.reason, message=message)
            checks = "\n".join(f"{'PASS' if c.passed else 'FAIL'} {c.text}" for c in o.result.checks)
            failure.text = "\n".join(filter(None, (_xml_text(checks) or message, _xml_text(_channels_line(o.result)))))
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    """XML 1.0 has no way to write most control characters (ESC, NUL…): a target's text showing them would make
    the whole report unreadable to CI, so they are shown as \\xNN instead."""
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def as_table(outcomes: list[Outcome], message_width: int = 90) -> str:
    header = ("PROBE", "TYPE", "CHANNEL", "RESULT", "REASON", "TIME", "ATTEMPTS", "MESSAGE")
    rows = [header] + [
        (
            o.settings.name,
            o.settings.type,
            o.settings.channel,
            o.verdict,
            o.result.reason,
            f"{o.result.duration_seconds * 1000:.0f}ms",
            str(o.result.attempts),
            _clip(o.result.message, message_width),
        )
        for o in outcomes
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row, outcome in zip(rows, [None, *outcomes]):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
        channels = _channels_line(outcome.result) if outcome is not None else ""
        if channels:  # under its probe's row, indented, so the table's columns stay as they are
            lines.append(f"  {channels}")
    verdicts = [o.verdict for o in outcomes]
    warned = f", {_count(verdicts.count('WARN'), 'warning')}" if "WARN" in verdicts else ""
    starved = ""
    if "STARVED" in verdicts:
        starved = (f", {verdicts.count('STARVED')} starved (this machine was too busy to finish "
                   f"{'them' if verdicts.count('STARVED') > 1 else 'it'}: no verdict; run again on a quieter machine)")
    lines.append(f"\n{_count(verdicts.count('PASS'), 'probe')} passed, {_count(verdicts.count('FAIL'), 'probe')} failed{warned}{starved}")
    return "\n".join(line.rstrip() for line in lines)


def _channels_line(result: Result) -> str:
    """What the platform reported of its channels, down ones first: "channels: whatsapp down; email, web_form up"."""
    down = sorted(printable(name) for name, up in result.channels.items() if not up)
    up = sorted(printable(name) for name, up in result.channels.items() if up)
    parts = [f"{', '.join(down)} down"] if down else []
    parts += [f"{', '.join(up)} up"] if up else []
    return f"channels: {'; '.join(parts)}" if parts else ""


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _count(number: int, noun: str) -> str:
    """"1 probe", "2 probes", "0 probes"."""
    return f"{number} {noun}{'' if number == 1 else 's'}"
