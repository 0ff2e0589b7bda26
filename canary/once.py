"""`probe --once`: every selected probe once, concurrently, reported as a table, JSON or JUnit XML."""

from __future__ import annotations

import asyncio
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable, Iterable

from canary.config import Config
from canary.contract import Probe, ProbeSettings, Result
from canary.runner import run_once
from canary.scheduler import ProbeBuildError


@dataclass(frozen=True)
class Outcome:
    settings: ProbeSettings
    result: Result

    @property
    def verdict(self) -> str:
        """PASS, FAIL, or WARN for a failed probe of severity "warning" (which does not fail the run)."""
        if self.result.success:
            return "PASS"
        return "WARN" if self.settings.severity == "warning" else "FAIL"


def all_passed(outcomes: list[Outcome]) -> bool:
    return all(o.verdict != "FAIL" for o in outcomes)


def select(probes: Iterable[ProbeSettings], only: list[str]) -> list[ProbeSettings]:
    """Probes whose name or channel is in `only` (all of them when `only` is empty)."""
    wanted = set(only)
    return [p for p in probes if not wanted or p.name in wanted or p.channel in wanted]


async def run_all(
    config: Config, probes: list[ProbeSettings], build_probe: Callable[[ProbeSettings], Probe]
) -> list[Outcome]:
    """Every probe once, concurrently. Raises ProbeBuildError, before anything ran, when one cannot be built."""
    scrub = config.scrubber()
    built: list[tuple[ProbeSettings, Probe]] = []
    for settings in probes:
        try:
            built.append((settings, build_probe(settings)))
        except Exception as exc:  # noqa: BLE001 - reported as a config problem, like the daemon does
            await asyncio.gather(*(probe.close() for _, probe in built), return_exceptions=True)
            raise ProbeBuildError(settings.name, scrub(f"{type(exc).__name__}: {exc}")) from None

    async def one(settings: ProbeSettings, probe: Probe) -> Outcome:
        try:
            return Outcome(settings, await run_once(probe, settings.timeout or 10.0, scrub))
        finally:
            await probe.close()

    return list(await asyncio.gather(*(one(settings, probe) for settings, probe in built)))


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
            "message": o.result.message,
            "phases": {k: round(v, 6) for k, v in sorted(o.result.phases.items())},
            "checks": [{"passed": c.passed, "text": c.text} for c in o.result.checks],
        }
        for o in outcomes
    ]
    verdicts = [o.verdict for o in outcomes]
    return json.dumps(
        {"results": results, "passed": verdicts.count("PASS"), "failed": verdicts.count("FAIL"),
         "warnings": verdicts.count("WARN")},
        indent=2,
    )


def as_junit(outcomes: list[Outcome]) -> str:
    failures = sum(o.verdict == "FAIL" for o in outcomes)
    warnings = sum(o.verdict == "WARN" for o in outcomes)
    total_time = sum(o.result.duration_seconds for o in outcomes)
    suites = ET.Element("testsuites", name="channel-canary", tests=str(len(outcomes)), failures=str(failures))
    suite = ET.SubElement(
        suites, "testsuite", name="channel-canary", tests=str(len(outcomes)),
        failures=str(failures), errors="0", skipped=str(warnings), time=f"{total_time:.3f}",
    )
    for o in outcomes:
        case = ET.SubElement(
            suite, "testcase", classname=f"{o.settings.channel}.{o.settings.type}",
            name=o.settings.name, time=f"{o.result.duration_seconds:.3f}",
        )
        message = _xml_text(o.result.message)
        if o.verdict == "WARN":  # shown, but not a failed build
            ET.SubElement(case, "skipped", type="warning", message=f"{o.result.reason}: {message}")
        elif not o.result.success:
            failure = ET.SubElement(case, "failure", type=o.result.reason, message=message)
            checks = "\n".join(f"{'PASS' if c.passed else 'FAIL'} {c.text}" for c in o.result.checks)
            failure.text = _xml_text(checks) or message
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    """XML 1.0 has no way to write most control characters (ESC, NUL…): a target's text showing them would make
    the whole report unreadable to CI, so they are shown as \\xNN instead."""
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def as_table(outcomes: list[Outcome], message_width: int = 90) -> str:
    header = ("PROBE", "TYPE", "CHANNEL", "RESULT", "REASON", "TIME", "MESSAGE")
    rows = [header] + [
        (
            o.settings.name,
            o.settings.type,
            o.settings.channel,
            o.verdict,
            o.result.reason,
            f"{o.result.duration_seconds * 1000:.0f}ms",
            _clip(o.result.message, message_width),
        )
        for o in outcomes
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    verdicts = [o.verdict for o in outcomes]
    warned = f", {_count(verdicts.count('WARN'), 'warning')}" if "WARN" in verdicts else ""
    lines.append(f"\n{_count(verdicts.count('PASS'), 'probe')} passed, {_count(verdicts.count('FAIL'), 'probe')} failed{warned}")
    return "\n".join(line.rstrip() for line in lines)


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _count(number: int, noun: str) -> str:
    """"1 probe", "2 probes", "0 probes"."""
    return f"{number} {noun}{'' if number == 1 else 's'}"
