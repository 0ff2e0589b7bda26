"""`probe sandbox`: a small stand-in for the support platform, so the shipped config has something real to probe.

It answers like the platform (`GET /health` with its channel map) and lets tests and demos switch faults on
through `POST /_sandbox/faults` (JSON) — e.g. `{"health": "hang"}` or `{"channels": {"whatsapp": "inactive"}}`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

HEALTH_MODES = ("ok", "error", "hang", "slow", "degraded", "malformed")
HANG_SECONDS = 300.0


@dataclass
class Faults:
    health: str = "ok"
    slow_seconds: float = 2.0
    database: str = "active"
    channels: dict[str, str] = field(
        default_factory=lambda: {"email": "active", "whatsapp": "active", "web_form": "active"}
    )

    def update(self, changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if key == "health":
                if value not in HEALTH_MODES:
                    raise ValueError(f"health must be one of {', '.join(HEALTH_MODES)}")
                self.health = value
            elif key == "slow_seconds":
                self.slow_seconds = min(float(value), HANG_SECONDS)
            elif key == "database":
                self.database = str(value)
            elif key == "channels" and isinstance(value, dict):
                self.channels.update({str(k): str(v) for k, v in value.items()})
            else:
                raise ValueError(f"unknown fault {key!r}")

    def as_dict(self) -> dict[str, Any]:
        return {"health": self.health, "slow_seconds": self.slow_seconds, "database": self.database,
                "channels": dict(self.channels)}


FAULTS = web.AppKey("faults", Faults)


def build_sandbox_app() -> web.Application:
    app = web.Application()
    app[FAULTS] = Faults()
    app.router.add_get("/health", _health)
    app.router.add_get("/_sandbox/faults", _get_faults)
    app.router.add_post("/_sandbox/faults", _set_faults)
    app.router.add_post("/_sandbox/reset", _reset)
    return app


async def _health(request: web.Request) -> web.Response:
    faults = request.app[FAULTS]
    if faults.health == "hang":
        await asyncio.sleep(HANG_SECONDS)
    if faults.health == "slow":
        await asyncio.sleep(faults.slow_seconds)
    if faults.health == "error":
        return web.json_response({"detail": "Internal Server Error"}, status=500)
    if faults.health == "malformed":
        return web.Response(text='{"status": "healthy", "channels": {', content_type="application/json")
    degraded = faults.health == "degraded" or faults.database != "active"
    return web.json_response(
        {"status": "degraded" if degraded else "healthy", "channels": dict(faults.channels), "database": faults.database}
    )


async def _get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[FAULTS].as_dict())


async def _set_faults(request: web.Request) -> web.Response:
    try:
        changes = await request.json()
        if not isinstance(changes, dict):
            raise ValueError("expected a JSON object")
        request.app[FAULTS].update(changes)
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(request.app[FAULTS].as_dict())


async def _reset(request: web.Request) -> web.Response:
    faults = request.app[FAULTS]
    vars(faults).update(vars(Faults()))
    return web.json_response(request.app[FAULTS].as_dict())
