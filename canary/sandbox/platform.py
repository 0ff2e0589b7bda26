"""The platform itself: `GET /health` with its channel map, and the web support form with its tickets.

A submitted ticket gets an AI-agent reply after `agent_delay_seconds` (unless the agent is stalled), like the
real worker picking it off Kafka: raise it to make the agent slow. `delete = "error"` makes every delete fail.
`GET /support/tickets` lists the tickets as a platform's admin API would (id, subject, status, creation time), for
the transaction probe's sweep; `GET /_sandbox/tickets` lists what exists with the sandbox's own view of it (which
ones came marked synthetic), so tests can prove cleanup.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from canary.sandbox.faults import FAULTS, HANG_SECONDS

FAULT_DEFAULTS: dict[str, Any] = {
    "health": "ok",
    "slow_seconds": 2.0,
    "health_unavailable": 0,  # the next N GET /health answer 503, then as `health` says (a blip, for retries)
    "database": "active",
    "channels": {"email": "active", "whatsapp": "active", "web_form": "active"},
    "submit": "ok",
    "agent": "ok",
    "agent_delay_seconds": 0.5,
    "delete": "ok",
}
FAULT_CHOICES = {
    "health": ("ok", "error", "hang", "slow", "degraded", "malformed"),
    # slow: the ticket is created at once, its answer comes `slow_seconds` later (a kill meanwhile leaves a ticket
    # whose id the canary never learned: only a sweep finds it).
    "submit": ("ok", "error", "hang", "no_ticket_id", "slow"),
    "agent": ("ok", "stalled", "escalate"),
    "delete": ("ok", "error", "hang"),
}
REQUIRED_FIELDS = ("name", "email", "subject", "message")


@dataclass
class Ticket:
    ticket_id: str
    subject: str
    synthetic: bool
    status: str = "open"
    messages: list[dict[str, str]] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {"ticket_id": self.ticket_id, "status": self.status, "messages": list(self.messages)}

    def summary(self) -> dict[str, Any]:
        created = datetime.fromtimestamp(self.created, timezone.utc).isoformat(timespec="milliseconds")
        return {"ticket_id": self.ticket_id, "subject": self.subject, "status": self.status, "created_at": created}


class TicketDesk:
    def __init__(self) -> None:
        self.tickets: dict[str, Ticket] = {}
        self._numbers = itertools.count(1001)
        self._replies: set[asyncio.TimerHandle] = set()

    def open(self, form: dict[str, str], synthetic: bool) -> Ticket:
        ticket = Ticket(f"TKT-{next(self._numbers)}", form["subject"], synthetic)
        ticket.messages.append({"role": "customer", "content": form["message"]})
        self.tickets[ticket.ticket_id] = ticket
        return ticket

    def schedule_reply(self, ticket: Ticket, delay: float, escalate: bool) -> None:
        def reply() -> None:
            if ticket.ticket_id in self.tickets:
                ticket.messages.append({"role": "agent", "content": "Thanks for reaching out — here is what to do next."})
                ticket.status = "escalated" if escalate else "responded"

        handle = asyncio.get_running_loop().call_later(delay, reply)
        self._replies.add(handle)

    def cancel_replies(self) -> None:
        for handle in self._replies:
            handle.cancel()
        self._replies.clear()


DESK = web.AppKey("ticket_desk", TicketDesk)


def add_routes(app: web.Application) -> None:
    app[DESK] = TicketDesk()
    app.router.add_get("/health", _health)
    app.router.add_post("/support/submit", _submit)
    app.router.add_get("/support/ticket/{ticket_id}", _get_ticket)
    app.router.add_delete("/support/ticket/{ticket_id}", _delete_ticket)
    app.router.add_get("/support/tickets", _ticket_index)
    app.router.add_get("/_sandbox/tickets", _list_tickets)

    async def _stop_replies(app: web.Application) -> None:
        app[DESK].cancel_replies()

    app.on_cleanup.append(_stop_replies)


async def _health(request: web.Request) -> web.Response:
    faults = request.app[FAULTS]
    if faults["health_unavailable"] >= 1:
        faults.update({"health_unavailable": faults["health_unavailable"] - 1})
        return web.json_response({"detail": "Service Unavailable"}, status=503)
    mode = faults["health"]
    if mode == "hang":
        await asyncio.sleep(HANG_SECONDS)
    if mode == "slow":
        await asyncio.sleep(faults["slow_seconds"])
    if mode == "error":
        return web.json_response({"detail": "Internal Server Error"}, status=500)
    if mode == "malformed":
        return web.Response(text='{"status": "healthy", "channels": {', content_type="application/json")
    degraded = mode == "degraded" or faults["database"] != "active"
    return web.json_response(
        {"status": "degraded" if degraded else "healthy", "channels": dict(faults["channels"]), "database": faults["database"]}
    )


async def _submit(request: web.Request) -> web.Response:
    faults = request.app[FAULTS]
    if faults["submit"] == "hang":
        await asyncio.sleep(HANG_SECONDS)
    if faults["submit"] == "error":
        return web.json_response({"detail": "Internal Server Error"}, status=500)
    try:
        form = await request.json()
    except ValueError:
        return web.json_response({"detail": "body must be JSON"}, status=422)
    missing = [name for name in REQUIRED_FIELDS if not isinstance(form, dict) or not form.get(name)]
    if missing:
        return web.json_response({"detail": f"missing fields: {', '.join(missing)}"}, status=422)
    desk = request.app[DESK]
    ticket = desk.open(form, synthetic=request.headers.get("X-Synthetic-Canary") == "1")
    if faults["agent"] != "stalled":
        desk.schedule_reply(ticket, faults["agent_delay_seconds"], escalate=faults["agent"] == "escalate")
    if faults["submit"] == "no_ticket_id":
        return web.json_response({"message": "received"}, status=201)
    if faults["submit"] == "slow":
        await asyncio.sleep(faults["slow_seconds"])
    return web.json_response({"ticket_id": ticket.ticket_id, "message": "received"}, status=201)


async def _get_ticket(request: web.Request) -> web.Response:
    ticket = request.app[DESK].tickets.get(request.match_info["ticket_id"])
    if ticket is None:
        return web.json_response({"detail": "ticket not found"}, status=404)
    return web.json_response(ticket.as_dict())


async def _delete_ticket(request: web.Request) -> web.Response:
    faults = request.app[FAULTS]
    if faults["delete"] == "hang":
        await asyncio.sleep(HANG_SECONDS)
    if faults["delete"] == "error":
        return web.json_response({"detail": "Internal Server Error"}, status=500)
    ticket = request.app[DESK].tickets.pop(request.match_info["ticket_id"], None)
    if ticket is None:
        return web.json_response({"detail": "ticket not found"}, status=404)
    return web.Response(status=204)


async def _list_tickets(request: web.Request) -> web.Response:
    tickets = request.app[DESK].tickets.values()
    return web.json_response(
        {"tickets": [{**t.as_dict(), "subject": t.subject, "synthetic": t.synthetic} for t in tickets]}
    )


async def _ticket_index(request: web.Request) -> web.Response:
    """The platform-style listing, oldest first: what a sweep reads (no sandbox-only fields)."""
    tickets = sorted(request.app[DESK].tickets.values(), key=lambda t: t.created)
    return web.json_response({"tickets": [t.summary() for t in tickets], "count": len(tickets)})

