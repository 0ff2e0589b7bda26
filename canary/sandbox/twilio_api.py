"""A stand-in for Twilio's REST API under `/twilio`: `GET /twilio/2010-04-01/Accounts/{Sid}.json`.

It answers with Twilio's account JSON and its error JSON (20003 Authenticate, 20404 not found, 20500), behind
HTTP Basic auth with the account SID and auth token from `TWILIO_ACCOUNT_SID` / `TWILIO_AUTH_TOKEN` (read when
the app is built), so the twilio SDK pointed at `<sandbox>/twilio` works unchanged.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from typing import Any

from aiohttp import BasicAuth, hdrs, web

from canary.sandbox.faults import FAULTS, HANG_SECONDS
from canary.sandbox.whatsapp import DEFAULT_AUTH_TOKEN

PREFIX = "/twilio"
DEFAULT_ACCOUNT_SID = "AC" + "0" * 32
FAULT_DEFAULTS: dict[str, Any] = {"twilio_account": "active"}
FAULT_CHOICES = {"twilio_account": ("active", "suspended", "closed", "unauthorized", "error", "hang")}
_SUBRESOURCES = {
    "available_phone_numbers": "AvailablePhoneNumbers", "calls": "Calls", "conferences": "Conferences",
    "incoming_phone_numbers": "IncomingPhoneNumbers", "notifications": "Notifications",
    "outgoing_caller_ids": "OutgoingCallerIds", "recordings": "Recordings", "transcriptions": "Transcriptions",
    "addresses": "Addresses", "signing_keys": "SigningKeys", "connect_apps": "ConnectApps", "sip": "SIP",
    "authorized_connect_apps": "AuthorizedConnectApps", "usage": "Usage", "keys": "Keys",
    "applications": "Applications", "short_codes": "SMS/ShortCodes", "queues": "Queues", "messages": "Messages",
    "balance": "Balance",
}
_CREDENTIALS = web.AppKey("twilio_credentials", tuple)


def add_routes(app: web.Application) -> None:
    app[_CREDENTIALS] = (
        os.environ.get("TWILIO_ACCOUNT_SID") or DEFAULT_ACCOUNT_SID,
        os.environ.get("TWILIO_AUTH_TOKEN") or DEFAULT_AUTH_TOKEN,
    )
    app.router.add_get(PREFIX + "/2010-04-01/Accounts/{sid}.json", _fetch_account)


def _error(status: int, code: int, message: str, **headers: str) -> web.Response:
    """Twilio's REST error body, e.g. {"code": 20003, "message": "Authenticate", ...}."""
    body = {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status}
    return web.json_response(body, status=status, headers={"Twilio-Request-Id": _request_id(), **headers})


def _unauthorized() -> web.Response:
    return _error(401, 20003, "Authenticate", **{hdrs.WWW_AUTHENTICATE: 'Basic realm="Twilio API"'})


def _request_id() -> str:
    return "RQ" + secrets.token_hex(16)


def _authenticated(request: web.Request) -> bool:
    try:
        auth = BasicAuth.decode(request.headers.get(hdrs.AUTHORIZATION, ""))
    except ValueError:
        return False
    sid, token = request.app[_CREDENTIALS]
    return secrets.compare_digest(auth.login.encode(), sid.encode()) and secrets.compare_digest(
        auth.password.encode(), token.encode()
    )


async def _fetch_account(request: web.Request) -> web.Response:
    mode = request.app[FAULTS]["twilio_account"]
    if mode == "hang":
        await asyncio.sleep(HANG_SECONDS)
    if mode == "error":
        return _error(500, 20500, "An internal server error has occurred")
    if mode == "unauthorized" or not _authenticated(request):
        return _unauthorized()
    sid, token = request.app[_CREDENTIALS]
    if request.match_info["sid"] != sid:
        return _error(404, 20404, f"The requested resource {request.path.removeprefix(PREFIX)} was not found")
    return web.json_response(_account(sid, token, status=mode), headers={"Twilio-Request-Id": _request_id()})


def _account(sid: str, token: str, status: str) -> dict[str, Any]:
    base = f"/2010-04-01/Accounts/{sid}"
    return {
        "auth_token": token,
        "date_created": "Thu, 30 Jul 2015 20:00:00 +0000",
        "date_updated": "Thu, 30 Jul 2015 20:00:00 +0000",
        "friendly_name": "channel-canary sandbox",
        "owner_account_sid": sid,
        "sid": sid,
        "status": status,
        "subresource_uris": {name: f"{base}/{path}.json" for name, path in _SUBRESOURCES.items()},
        "type": "Full",
        "uri": f"{base}.json",
    }
