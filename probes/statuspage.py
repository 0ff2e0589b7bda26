"""`statuspage` probe: a provider's public Atlassian Statuspage, read as one number and a sentence.

`GET /api/v2/status.json` answers `{"page": {...}, "status": {"indicator": "none|minor|major|critical",
"description": "All Systems Operational"}}`. The indicator becomes `canary_probe_statuspage_indicator` (0-3), and the
run fails once it reaches `fail_at`: the provider itself says it is down, whatever our own probes see.
"""

from __future__ import annotations

import json
from typing import Literal

import aiohttp
from pydantic import field_validator
from yarl import URL

from canary.contract import Gauge, PhaseTimer, Probe, ProbeSettings, Result, USER_AGENT
from probes.transport import LazySession, client_error_result, http_url, read_limited, url_for_humans

STATUS_PATH = "/api/v2/status.json"
# Statuspage's documented indicators, worst last. "maintenance" is undocumented but real (a scheduled window in
# progress): it is announced work, so it counts as minor.
INDICATORS = {"none": 0, "minor": 1, "major": 2, "critical": 3, "maintenance": 1}
_MAX_BODY_BYTES = 262_144
_MAX_DESCRIPTION = 200


class StatuspageSettings(ProbeSettings):
    type: Literal["statuspage"] = "statuspage"
    url: str
    fail_at: Literal["minor", "major", "critical"] = "major"

    @field_validator("url")
    @classmethod
    def _valid_url(cls, url: str) -> str:
        return http_url(url)

    def status_url(self) -> URL:
        """The page's status.json: the URL itself if it names a .json file, else the page with the standard path."""
        parsed = URL(self.url)
        if parsed.path.endswith(".json"):
            return parsed
        return parsed.with_path(parsed.path.rstrip("/") + STATUS_PATH)

    def target(self) -> str:
        return f"GET {url_for_humans(str(self.status_url()))}"


class StatuspageProbe(Probe[StatuspageSettings]):
    settings_model = StatuspageSettings
    reasons = ("status", "tls", "dns", "connect", "body", "assertion")

    def __init__(self, settings: StatuspageSettings) -> None:
        super().__init__(settings)
        self._url = settings.status_url()
        self._sessions = LazySession(headers={"User-Agent": USER_AGENT, "Accept": "application/json"})

    async def close(self) -> None:
        await self._sessions.close()

    async def run(self, timer: PhaseTimer) -> Result:
        try:
            with timer.phase("fetch"):
                async with self._sessions.get().get(self._url) as response:
                    body, error = await read_limited(response, _MAX_BODY_BYTES)
                    status = response.status
        except aiohttp.ClientError as exc:
            return client_error_result(exc)
        if status != 200:
            return Result.fail("status", f"HTTP {status} from the status page, expected 200")
        if error:
            return Result.fail("body", error)
        return self._judge(body)

    def _judge(self, body: bytes) -> Result:
        try:
            status = json.loads(body)["status"]
            indicator, description = str(status["indicator"]), str(status.get("description") or "")
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            return Result.fail("assertion", 'the status page did not answer in the Statuspage shape {"status": {"indicator": …}}')
        description = " ".join(description.split())[:_MAX_DESCRIPTION]
        level = INDICATORS.get(indicator)
        if level is None:
            return Result.fail("assertion", f"the status page reports an unknown indicator {indicator[:40]!r} ({description})")
        gauge = Gauge("statuspage_indicator", level, "The provider's own status: 0 none, 1 minor, 2 major, 3 critical.")
        summary = f"the provider reports {indicator}: {description or 'no description'}"
        if level >= INDICATORS[self.settings.fail_at]:
            return Result.fail("assertion", f"{summary} (fails at {self.settings.fail_at} or worse)", gauges=(gauge,))
        return Result.ok(summary, gauges=(gauge,))
