"""`probe sandbox`: a stand-in for the support platform and the services around it, speaking their wire formats,
so the shipped config has something real to probe on a fresh machine and tests can switch faults on.

Each component (the platform itself, and stand-ins for the providers it uses) is one module that declares its
faults and adds its routes. Faults are read and set over HTTP: `GET/POST /_sandbox/faults`, `POST /_sandbox/reset`.
"""

from __future__ import annotations

from aiohttp import web

from canary.sandbox import gmail, llm, platform, twilio_api, whatsapp
from canary.sandbox.faults import FAULTS, FaultBoard

COMPONENTS = (platform, whatsapp, twilio_api, llm, gmail)


def build_sandbox_app() -> web.Application:
    app = web.Application()
    board = FaultBoard()
    app[FAULTS] = board
    for component in COMPONENTS:
        board.declare(component.FAULT_DEFAULTS, getattr(component, "FAULT_CHOICES", {}))
        component.add_routes(app)
    app.router.add_get("/_sandbox/faults", _get_faults)
    app.router.add_post("/_sandbox/faults", _set_faults)
    app.router.add_post("/_sandbox/reset", _reset)
    return app


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
    request.app[FAULTS].reset()
    return web.json_response(request.app[FAULTS].as_dict())
